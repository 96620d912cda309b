"""secure/ is the bottom layer: pure functions on arrays and bytes that import no role and not Flower."""

import ast
from pathlib import Path

import pytest

SECURE = Path(__file__).resolve().parent.parent / "secure"
# Roles and the runtime. (torch is not listed: secure/noise.py draws DP noise on the training device.)
FORBIDDEN = ("fedveil.platform", "fedveil.clients", "fedveil.aggregator", "fedveil.dashboard", "flwr")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(SECURE.glob("*.py")), ids=lambda p: p.name)
def test_secure_imports_nothing_above_it(path):
    bad = [m for m in imported_modules(path) if m == "fedveil.platform" or m.startswith(FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}; secure/ must stay free of the roles and of Flower"


def test_platform_errors_reexport_the_secure_errors_so_the_cli_prints_them():
    """The CLI catches fedveil.platform.errors.FedveilError: a secure error must be one, with its fix."""
    from fedveil.platform import errors as platform_errors
    from fedveil.secure import errors as secure_errors

    assert platform_errors.FedveilError is secure_errors.FedveilError
    assert platform_errors.SecurityError is secure_errors.SecurityError
    err = secure_errors.RangeError("value too large", "set secure.max_clients")
    assert isinstance(err, platform_errors.FedveilError) and isinstance(err, ValueError)
    assert (err.problem, err.fix) == ("value too large", "set secure.max_clients")
