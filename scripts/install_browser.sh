#!/usr/bin/env bash
# Install what the dashboard's real-browser test needs on a fresh Debian machine:
#   * Debian's chromium package (the test drives /usr/bin/chromium, never a downloaded browser);
#   * the Playwright Python package (its driver only: we do NOT run `playwright install`).
# Idempotent and quiet: does nothing when both are already present.
# Usage: bash scripts/install_browser.sh   (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    else
        PYTHON="$(command -v python3 || command -v python)"
    fi
fi

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "playwright>=1.45"
fi

/usr/bin/chromium --version >/dev/null 2>&1 || { echo "chromium is not usable" >&2; exit 1; }
"$PYTHON" -c "import playwright.sync_api" || { echo "playwright is not importable" >&2; exit 1; }
