#!/usr/bin/env bash
# Create .venv and install admflow. torch==2.13.0 first (a torch >= 2.4 already in .venv,
# e.g. a CUDA build, is kept): on these machines it is a CPU build on local disk; an
# unpinned torch would pull a multi-GB CUDA build.
# uv installs in about 35 s what takes pip about two minutes; pip remains the fallback
# (ADMFLOW_INSTALLER=pip forces it). Both read the same pins (constraints.txt, the tested
# versions, so neither backtracks through the registry) and pip's find-links, where a local
# torch build may lie.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="fid"
[ "${1:-}" = test ] && extras="fid,test"
[ -x .venv/bin/python ] || python3 -m venv .venv

# the torch to install, or nothing when .venv has one the project accepts
torch_pin() {
  .venv/bin/python -c 'import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if v >= (2, 4) else 1)' 2>/dev/null || echo torch==2.13.0
}
TORCH=$(torch_pin)

install_with_uv() {
  .venv/bin/pip install -q uv || return 1
  local links=() dir
  for dir in $(.venv/bin/pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
    links+=(--find-links "$dir")
  done
  # --compile-bytecode: pip writes .pyc files at install, uv only when asked; without them
  # every process compiles its imports anew where PYTHONDONTWRITEBYTECODE is set (2x the
  # start-up time of each Ray worker and CLI process)
  local uv=(.venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python "${links[@]}")
  { [ -z "$TORCH" ] || "${uv[@]}" "$TORCH"; } && "${uv[@]}" -c constraints.txt -e ".[$extras]"
}

if [ "${ADMFLOW_INSTALLER:-uv}" != pip ]; then
  install_with_uv && exit 0
  echo "warning: installing with uv failed; installing with pip" >&2
fi
[ -z "$TORCH" ] || .venv/bin/pip install -q "$TORCH"
.venv/bin/pip install -q -c constraints.txt -e ".[$extras]"
