#!/usr/bin/env bash
# Create .venv and install admflow. torch==2.13.0 first: on these machines it is a CPU
# build on local disk; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="fid"
[ "${1:-}" = test ] && extras="fid,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
# constraints.txt: the tested versions, so pip does not backtrack through the registry
.venv/bin/pip install -q -c constraints.txt -e ".[$extras]"
