#!/usr/bin/env bash
# The fast tier: config, math, formats and CLI errors; no Ray, no servers, no browser, nothing
# marked slow. Run it while changing the math (about 2 minutes on 2 cores). Needs the .venv of
# scripts/install.sh test; extra arguments go to pytest (e.g. tests/test_diffusion.py, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
pytest -q -m "not slow and not ray and not services and not browser" "$@"
