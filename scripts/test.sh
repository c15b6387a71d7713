#!/usr/bin/env bash
# Install everything the tests need into .venv (idempotent) and run the suite.
# Ray listens on every interface, so when we can (root + unshare) the tests run inside a
# private network namespace where only loopback exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# The browser test drives headless Chromium. Locally a failed install is a warning and the test
# skips; in CI (CI=true) the browser is required, so a missing one fails here and in the test.
have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
if ! have_chromium && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: apt-get install chromium failed" >&2
fi
if ! have_chromium; then
  if [ "${CI:-}" = true ]; then
    echo "error: CI=true but chromium is not installed; the browser test needs it" >&2
    exit 1
  fi
  echo "warning: chromium not installed; browser tests will skip" >&2
fi
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy models tasks"; mypy models tasks
echo "== pytest"
# TEST_WORKERS=N: N pytest-xdist workers (default 2; 0: one process), each taking whole files,
# the longest first: one worker runs the demo's pipeline while the other works through the
# rest, each with torch on its share of the cores (docs/ARCHITECTURE.md).
# --max-worker-restart 0: a worker ended by a hang guard (the "thread" timeouts) is not
# replaced, since a new worker would run the hung file's fixture again, hang for as long, and
# again up to xdist's default of eight restarts.
args=(-q -ra --durations=30 -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder
  --max-worker-restart 0)
set +e
if [ "$(id -u)" = 0 ] && unshare --net --fork true 2>/dev/null; then
  unshare --net --fork sh -c 'ip link set lo up 2>/dev/null || true; exec pytest "$@"' pytest "${args[@]}" "$@"
else
  echo "warning: cannot create a loopback-only network namespace; running tests without it" >&2
  pytest "${args[@]}" "$@"
fi
rc=$?
# pytest exits 5 when it collected nothing: that is a failure here, never hidden.
[ $rc -eq 5 ] && echo "pytest collected no tests" >&2
exit $rc
