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

NETNS=0
if [ "$(id -u)" = 0 ] && unshare --net --fork true 2>/dev/null; then
  NETNS=1
else
  echo "warning: cannot create a loopback-only network namespace; running tests without it" >&2
fi
REPORT=test-output/hang-report.txt
mkdir -p test-output && rm -rf "$REPORT" test-output/stacks

# run_pytest NAME LIMIT_S ARGS...: pytest in the foreground (Ctrl-C reaches it), with a
# watchdog beside it. Past LIMIT_S the watchdog writes what every process was doing (each
# pytest process's thread stacks, by the SIGUSR1 handler tests/conftest.py registers; the
# process table; memory and disk) to test-output/hang-report.txt and ends the run, so a hang
# costs its limit and leaves evidence, whatever holds the interpreter.
run_pytest() {
  local name=$1 limit=$2; shift 2
  local stop; stop=$(mktemp)
  scripts/watchdog.sh "$$" "$limit" "$stop" "$name" "$REPORT" &
  local dog=$! rc=0
  if [ $NETNS = 1 ]; then
    unshare --net --fork sh -c 'ip link set lo up 2>/dev/null || true; exec pytest "$@"' pytest "$@" || rc=$?
  else
    pytest "$@" || rc=$?
  fi
  rm -f "$stop"; wait "$dog" 2>/dev/null || true
  # pytest exits 5 when it collected nothing: that is a failure here, never hidden.
  [ $rc -eq 5 ] && echo "pytest collected no tests ($name)" >&2
  return $rc
}

common=(-q -ra --durations=20)
rc=0
if [ $# -gt 0 ]; then
  echo "== pytest $*"
  run_pytest "pytest $*" 4500 "${common[@]}" -n "${TEST_WORKERS:-2}" --dist loadfile \
    --max-worker-restart 0 "$@" || rc=$?
else
  # The demo's pipeline first, alone in one process: it is one chain of stages (three
  # trainings at once, then sampling and scoring) that uses both cores by itself. Then the
  # rest on TEST_WORKERS pytest-xdist workers (default 2; 0: one process), each taking whole
  # files, the longest first, with torch on its share of the cores (docs/ARCHITECTURE.md).
  # --max-worker-restart 0: a worker ended by a hang guard (the "thread" timeouts) is not
  # replaced, since a new worker would run the hung file's fixture again.
  echo "== pytest: the demo's pipeline (tests/test_flows.py)"
  run_pytest "the demo's pipeline" 1800 "${common[@]}" tests/test_flows.py || rc=$?
  echo "== pytest: the rest"
  rest_rc=0
  run_pytest "the rest" 2700 "${common[@]}" -n "${TEST_WORKERS:-2}" --dist loadfile \
    --no-loadscope-reorder --max-worker-restart 0 --ignore=tests/test_flows.py || rest_rc=$?
  [ $rc -eq 0 ] && rc=$rest_rc
fi
if [ -s "$REPORT" ]; then
  echo "== hang report ($REPORT)"; cat "$REPORT"
fi
exit $rc
