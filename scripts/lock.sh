#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh install resolved without it, so the pins move to the
# newest set the registry allows. Run the tests on the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q torch==2.13.0
"$tmp/venv/bin/pip" install -q -e ".[fid,test]"
{
  sed -n '1,4p' constraints.txt
  "$tmp/venv/bin/pip" freeze | grep -vE '^(-e |#|admflow|torch==)'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" constraints.txt
rm -rf "$tmp"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
