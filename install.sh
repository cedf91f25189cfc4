#!/usr/bin/env bash
# Installs captum-gig for development into ./.venv:
#   1. the Debian packages some tests and examples use (when apt-get is available):
#      dataset-fashion-mnist (a real dataset, offline), opencv-doc (its ~100 sample photos: the
#      demo uses the photographs among them), chromium (browser tests) and
#      libjs-mathjax (the docs render their math without network);
#   2. the package with all extras, torch pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"

DEBIAN_PACKAGES="dataset-fashion-mnist opencv-doc chromium libjs-mathjax"
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -q $DEBIAN_PACKAGES >/dev/null; then
        $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $DEBIAN_PACKAGES >/dev/null \
            || echo "warning: could not install $DEBIAN_PACKAGES; tests that need them will be skipped" >&2
    fi
else
    echo "note: no apt-get; install $DEBIAN_PACKAGES by other means to run every test" >&2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
echo "installed into $(pwd)/.venv"
