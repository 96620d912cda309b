"""Key custody (issue 8, defect 4): each party makes its own keys; the operator sees public keys only.

Each test plays one party with exactly what that party holds: the operator with the public
files, the server with OUT/server, an organization with its own directory and a fingerprint
checked out of band.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
from pathlib import Path

import pytest

from fedveil.platform import provision as P
from fedveil.platform.cli import main
from fedveil.platform.errors import ConfigError, SecurityError
from fedveil.secure import keys as K
from fedveil.secure.envelope import generate_x25519_keypair, open_envelope, seal
from fedveil.secure.modes import Binding

PROXIES = ("proxy-1", "proxy-2")
ORGS = ("hospital-a", "hospital-b")
BINDING = Binding("run", "task", "hospital-a", "proxy-1", "secret-sharing", 3)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _private_secrets(hosts: Path) -> dict[str, bytes]:
    """Every party's private key material, as the bytes that would leak it."""
    from cryptography.hazmat.primitives import serialization

    secrets = {}
    for name in PROXIES + ORGS:
        key = serialization.load_ssh_private_key((hosts / name / "supernode.key").read_bytes(), None)
        scalar = key.private_numbers().private_value.to_bytes(48, "big")
        secrets[f"{name} supernode scalar"] = scalar
        secrets[f"{name} supernode.key"] = (hosts / name / "supernode.key").read_bytes()
    for name in PROXIES:
        raw = (hosts / name / "proxies" / name / "x25519.key").read_bytes()
        secrets[f"{name} x25519"] = raw
        secrets[f"{name} x25519 b64"] = base64.b64encode(raw)
    return secrets


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory):
    """The multi-host ceremony on one disk: hosts/<party>/ (each party's host) and operator/ (the operator's)."""
    root = tmp_path_factory.mktemp("ceremony")
    hosts, operator = root / "hosts", root / "operator"
    operator.mkdir()
    publics = []
    for role, names in (("proxy", PROXIES), ("org", ORGS)):
        for name in names:
            public = P.generate_party(hosts / name, role, name)
            publics.append(Path(shutil.copy(public, operator)))  # the only file handed over
    fp = P.build_federation(operator / "out", [P.read_public(p) for p in publics], hosts=["fl.example.org"],
                            federation="t", ckks=True, ckks_poly_degree=4096)
    for name in PROXIES + ORGS:
        P.install_handout(operator / "out" / "handout", hosts / name, fp)
    return hosts, operator / "out", fp


def test_party_keys_are_private_and_the_public_file_holds_only_public_keys(ceremony):
    hosts, _, _ = ceremony
    for name in PROXIES + ORGS:
        d = hosts / name
        assert stat.S_IMODE((d / "supernode.key").stat().st_mode) == 0o600
        doc = json.loads((d / f"{name}.public.json").read_text())
        assert doc["role"] == ("proxy" if name in PROXIES else "org") and doc["name"] == name
        assert doc["supernode_public_key"].startswith("ecdsa-sha2-nistp384 ")
        assert len(doc["supernode_sha256"]) == 64
        if name in PROXIES:
            assert stat.S_IMODE((d / "proxies" / name / "x25519.key").stat().st_mode) == 0o600
            assert base64.b64decode(doc["x25519_public_key"]) == (d / "proxies" / name / "x25519.pub").read_bytes()
        else:
            assert "x25519_public_key" not in doc
        text = (d / f"{name}.public.json").read_bytes()
        assert all(secret not in text for secret in _private_secrets(hosts).values())


def test_the_operators_output_holds_no_private_key_of_any_proxy_or_org(ceremony):
    """Scan every byte the operator wrote for every party's private key material."""
    hosts, out, _ = ceremony
    secrets = _private_secrets(hosts)
    files = _files(out)
    assert {p.relative_to(out).as_posix() for p in files} >= {
        "server/superlink.key", "server/ckks_secret.ctx", "server/supernodes/proxy-1.pub", "handout/manifest.json",
        "handout/ca.pem", "handout/ckks/public.ctx"}
    for path in files:
        data = path.read_bytes()
        for what, secret in secrets.items():
            assert secret not in data, f"{what} found in {path}"
    # the only private files are the server's own, and the handout has none at all
    assert P.foreign_private_keys(out / "server", "server") == []
    assert P.foreign_private_keys(out / "handout", "org") == []
    assert not any(P._looks_private(p) for p in _files(out / "handout"))


def test_honest_ceremony_gives_working_keyrings(ceremony):
    """An organization seals to each proxy with the keys it installed; each proxy opens with its own dir."""
    hosts, out, fp = ceremony
    client = P.load_client_keyring_dir(hosts / "hospital-a")
    assert set(client.proxy_public_keys) == set(PROXIES)
    assert (hosts / "hospital-a" / P.PIN_FILE).read_text().strip() == fp
    for name in PROXIES:
        proxy = P.load_proxy_keyring_dir(hosts / name, name)
        b = Binding("run", "task", "hospital-a", name, "secret-sharing", 3)
        assert open_envelope(seal(b"share", client.proxy_public_keys[name], b), proxy.private_key, b) == b"share"
        assert proxy.ckks_public_context == client.ckks_public_context
    server = P.load_server_keyring_dir(out / "server")
    # `fedveil server --keys` takes OUT/server, or the operator's OUT (server/ + public handout/)
    assert P.checked_server_bundle(out) == P.checked_server_bundle(out / "server") == (out / "server").resolve()
    assert server.ckks_secret_context and server.ckks_secret_context != client.ckks_public_context
    # the SuperNode registrations are exactly the keys the parties made
    for name in PROXIES + ORGS:
        assert (out / "server" / "supernodes" / f"{name}.pub").read_bytes() == (hosts / name / "supernode.pub").read_bytes()


def test_server_with_its_own_bundle_cannot_open_a_proxys_envelope(ceremony):
    """Play the server with exactly OUT/server: no file in it is (or contains) a proxy's private key."""
    hosts, out, _ = ceremony
    client = P.load_client_keyring_dir(hosts / "hospital-a")
    env = seal(b"hospital-a's share", client.proxy_public_keys["proxy-1"], BINDING)
    candidates = []
    for path in _files(out / "server"):
        data = path.read_bytes()
        candidates += [data[i:i + 32] for i in range(0, max(1, len(data) - 31), 1 if len(data) < 4096 else 97)]
    for key in candidates:
        if len(key) != 32:
            continue
        with pytest.raises(SecurityError):
            open_envelope(env, key, BINDING)
    with pytest.raises(SecurityError):  # nor can it load a proxy keyring from its bundle
        P.load_proxy_keyring_dir(out / "server", "proxy-1")
    # the honest recipient opens it
    assert open_envelope(env, P.load_proxy_keyring_dir(hosts / "proxy-1", "proxy-1").private_key, BINDING) \
        == b"hospital-a's share"


def test_server_given_the_old_whole_tree_is_refused(tmp_path, capsys):
    """The old README handed `fedveil server --keys keys` every bundle: with it the server opens envelopes."""
    whole = P.init_federation_keys(tmp_path / "keys", list(PROXIES), list(ORGS), ckks=False)
    # the attack the whole tree allows: proxy-1's key sits under the server's --keys
    client = P.load_client_keyring_dir(whole / "hospital-a")
    env = seal(b"update", client.proxy_public_keys["proxy-1"], BINDING)
    stolen = (whole / "proxy-1" / "proxies" / "proxy-1" / "x25519.key").read_bytes()
    assert open_envelope(env, stolen, BINDING) == b"update"
    # now: refused, with error/fix and exit 2, before any process starts
    cfg = tmp_path / "fed.toml"
    cfg.write_text("")
    code = main(["server", "--config", str(cfg), "--keys", str(whole), "--workdir", str(tmp_path / "w"),
                 "--superlink", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "fix:" in err
    assert "proxy-1/proxies/proxy-1/x25519.key" in err and "hospital-a/supernode.key" in err
    assert not (tmp_path / "w" / "logs").exists()  # no SuperLink was started
    with pytest.raises(SecurityError, match="not the server's"):
        P.load_server_keyring_dir(whole)
    with pytest.raises(SecurityError):
        P.checked_server_bundle(whole)
    # the honest server bundle is accepted
    assert P.checked_server_bundle(whole / "server") == (whole / "server").resolve()


def test_a_private_key_under_another_name_is_still_found(ceremony, tmp_path):
    hosts, out, _ = ceremony
    server = tmp_path / "server"
    shutil.copytree(out / "server", server)
    shutil.copy(hosts / "proxy-2" / "supernode.key", server / "notes.txt")  # OpenSSH PRIVATE KEY header
    (server / "backup").mkdir()
    shutil.copy(hosts / "proxy-1" / "proxies" / "proxy-1" / "x25519.key", server / "backup" / "x25519.key")
    assert P.foreign_private_keys(server, "server") == [Path("backup/x25519.key"), Path("notes.txt")]
    # an organization may not hold a proxy's key either, nor a proxy another proxy's
    org = tmp_path / "org"
    shutil.copytree(hosts / "hospital-a", org)
    shutil.copytree(hosts / "proxy-1" / "proxies", org / "proxies")
    with pytest.raises(SecurityError, match="organization|org"):
        P.load_client_keyring_dir(org)
    proxy2 = tmp_path / "proxy-2"
    shutil.copytree(hosts / "proxy-2", proxy2)
    shutil.copytree(hosts / "proxy-1" / "proxies" / "proxy-1", proxy2 / "proxies" / "proxy-1")
    with pytest.raises(SecurityError, match="proxy-1/x25519.key"):
        P.load_proxy_keyring_dir(proxy2, "proxy-2")
    with pytest.raises(SecurityError, match="proxy-1/x25519.key"):  # `fedveil proxy --keys` at start-up
        P.check_node_bundle(proxy2, "proxy", "proxy-2")
    P.check_node_bundle(hosts / "proxy-2", "proxy", "proxy-2")


def test_a_tampered_manifest_is_refused(ceremony, tmp_path):
    """The server swaps proxy-1's key for its own in the manifest: the pinned fingerprint catches it."""
    hosts, out, fp = ceremony
    handout = tmp_path / "handout"
    shutil.copytree(out / "handout", handout)
    doc = json.loads((handout / "manifest.json").read_text())
    _, attacker_pk = generate_x25519_keypair()
    doc["proxies"]["proxy-1"]["public_key"] = base64.b64encode(attacker_pk).decode()
    doc["proxies"]["proxy-1"]["fingerprint"] = K.fingerprint(attacker_pk)
    (handout / "manifest.json").write_text(json.dumps(doc, indent=2))
    org = tmp_path / "org"
    shutil.copytree(hosts / "hospital-b", org)
    before = (org / "manifest.json").read_bytes()
    with pytest.raises(SecurityError, match="not the pinned"):
        P.install_handout(handout, org, fp)
    assert (org / "manifest.json").read_bytes() == before  # nothing installed
    # a manifest swapped after installation is refused at every load (manifest.sha256 pins it)
    shutil.copy(handout / "manifest.json", org / "manifest.json")
    with pytest.raises(SecurityError, match="not the pinned"):
        P.load_client_keyring_dir(org)
    with pytest.raises(SecurityError, match="not the pinned"):
        P.check_node_bundle(hosts / "hospital-b", "client", "hospital-b", "0" * 64)
    P.check_node_bundle(hosts / "hospital-b", "client", "hospital-b", fp)  # honest path


def test_handout_parts_must_match_the_manifest(ceremony, tmp_path):
    hosts, out, fp = ceremony
    handout = tmp_path / "handout"
    shutil.copytree(out / "handout", handout)
    (handout / "ckks" / "public.ctx").write_bytes(b"another context")
    with pytest.raises(SecurityError, match="public.ctx"):
        P.install_handout(handout, tmp_path / "unused", fp)
    shutil.copy(out / "handout" / "ckks" / "public.ctx", handout / "ckks" / "public.ctx")
    (handout / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nother\n")
    org = tmp_path / "org"
    shutil.copytree(hosts / "hospital-a", org)
    with pytest.raises(SecurityError, match="ca.pem"):
        P.install_handout(handout, org, fp)


def test_a_proxy_refuses_a_manifest_that_lists_another_key_for_it(ceremony, tmp_path):
    """The operator substitutes a key it holds for proxy-1 and publishes that manifest's fingerprint."""
    hosts, _, _ = ceremony
    parties = [P.read_public(hosts / n / f"{n}.public.json") for n in PROXIES + ORGS]
    _, attacker_pk = generate_x25519_keypair()
    parties[0] = P.PartyPublic("proxy", "proxy-1", parties[0].supernode_public_key, attacker_pk)
    fp = P.build_federation(tmp_path / "out", parties, ckks=False)
    proxy = tmp_path / "proxy-1"
    shutil.copytree(hosts / "proxy-1", proxy)
    with pytest.raises(SecurityError, match="another X25519 key for proxy 'proxy-1'"):
        P.install_handout(tmp_path / "out" / "handout", proxy, fp)


def test_public_files_are_checked(ceremony, tmp_path):
    hosts, _, _ = ceremony
    src = hosts / "proxy-1" / "proxy-1.public.json"
    doc = json.loads(src.read_text())
    bad = dict(doc, x25519_public_key=base64.b64encode(b"x" * 32).decode())
    (tmp_path / "a.public.json").write_text(json.dumps(bad))
    with pytest.raises(SecurityError, match="x25519_sha256"):
        P.read_public(tmp_path / "a.public.json")
    leaked = dict(doc, note=(hosts / "proxy-1" / "supernode.key").read_text())
    (tmp_path / "b.public.json").write_text(json.dumps(leaked))
    with pytest.raises(SecurityError, match="private key"):
        P.read_public(tmp_path / "b.public.json")
    with pytest.raises(ConfigError, match="role"):
        P.generate_party(tmp_path / "s", "server", "x")
    with pytest.raises(ConfigError, match="reserved"):
        P.generate_party(tmp_path / "s", "org", "server")


def test_the_ceremony_through_the_cli(tmp_path, capsys):
    """keys gen per party, keys init from public files, keys fingerprint, keys install, as the README shows."""
    for role, name in (("proxy", "proxy-1"), ("org", "hospital-a")):
        assert main(["keys", "gen", "--role", role, "--name", name, "--out", str(tmp_path / name)]) == 0
    assert "hand " in capsys.readouterr().out
    op = tmp_path / "op"
    assert main(["keys", "init", "--out", str(op), "--no-ckks", "--hosts", "10.0.0.5",
                 "--public", str(tmp_path / "proxy-1" / "proxy-1.public.json"),
                 "--public", str(tmp_path / "hospital-a" / "hospital-a.public.json")]) == 0
    out = capsys.readouterr().out
    fp = out.split("manifest fingerprint (sha256): ")[1].split()[0]
    assert main(["keys", "fingerprint", str(op / "handout" / "manifest.json")]) == 0
    assert capsys.readouterr().out.strip() == fp
    assert main(["keys", "install", "--bundle", str(op / "handout"), "--out", str(tmp_path / "hospital-a"),
                 "--manifest-fingerprint", "1" * 64]) == 2
    assert "not the pinned" in capsys.readouterr().err
    for name in ("proxy-1", "hospital-a"):
        assert main(["keys", "install", "--bundle", str(op / "handout"), "--out", str(tmp_path / name),
                     "--manifest-fingerprint", fp]) == 0
    ring = P.load_client_keyring_dir(tmp_path / "hospital-a")
    proxy = P.load_proxy_keyring_dir(tmp_path / "proxy-1", "proxy-1")
    b = Binding("r", "t", "hospital-a", "proxy-1", "secret-sharing", 1)
    assert open_envelope(seal(b"x", ring.proxy_public_keys["proxy-1"], b), proxy.private_key, b) == b"x"
    assert main(["keys", "init", "--out", str(tmp_path / "x"), "--orgs", "a",
                 "--public", str(tmp_path / "proxy-1" / "proxy-1.public.json")]) == 2


def test_single_host_init_writes_one_directory_per_role(tmp_path, capsys):
    assert main(["keys", "init", "--out", str(tmp_path / "keys"), "--proxies", "2", "--orgs", "a,b", "--no-ckks"]) == 0
    assert "SINGLE-HOST USE ONLY" in capsys.readouterr().out
    keys = tmp_path / "keys"
    assert P.foreign_private_keys(keys / "server", "server") == []
    for name in ("proxy-1", "proxy-2"):
        assert P.foreign_private_keys(keys / name, "proxy", name) == []
        P.load_proxy_keyring_dir(keys / name, name)
    for name in ("a", "b"):
        assert P.foreign_private_keys(keys / name, "org") == []
        assert set(P.load_client_keyring_dir(keys / name).proxy_public_keys) == {"proxy-1", "proxy-2"}
