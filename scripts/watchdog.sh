#!/usr/bin/env bash
# watchdog.sh SHELL_PID LIMIT_S STOP_FILE NAME REPORT: scripts/test.sh's hang guard.
# Waits while STOP_FILE exists and SHELL_PID lives; once LIMIT_S have passed, writes what
# every process below SHELL_PID is doing to REPORT, then ends them (TERM, and KILL 20 s later).
set -u
shell=$1 limit=$2 stop=$3 name=$4 report=$5
end=$((SECONDS + limit))
while [ -e "$stop" ]; do
  kill -0 "$shell" 2>/dev/null || { rm -f "$stop"; exit 0; }  # the run was stopped (Ctrl-C)
  [ $SECONDS -ge $end ] && break
  sleep 5
done
[ -e "$stop" ] || exit 0

descendants() {  # every process below $1, this watchdog and its children excepted
  local all; all=$(ps -e -o pid=,ppid=)
  local todo=("$1") out=()
  while [ ${#todo[@]} -gt 0 ]; do
    local p=${todo[0]}; todo=("${todo[@]:1}")
    for c in $(awk -v p="$p" '$2 == p {print $1}' <<<"$all"); do
      [ "$c" = $$ ] && continue
      out+=("$c"); todo+=("$c")
    done
  done
  echo "${out[@]}"
}

pids=$(descendants "$shell")
stacks=test-output/stacks
{
  echo "hang guard: $name ran past ${limit} s at $(date -u +%FT%TZ); the processes below it:"
  # shellcheck disable=SC2086
  ps -o pid,ppid,stat,etimes,time,rss,args -p "$(tr ' ' , <<<"$pids")" 2>/dev/null | cut -c1-220
  echo "-- memory"; free -m
  echo "-- disk"; df -h /tmp /dev/shm 2>/dev/null
  echo "-- load"; cat /proc/loadavg
  echo "-- Ray sessions started since: memory kills in their raylet logs (last 20 lines)"
  find /tmp/ray -maxdepth 1 -name 'session_2*' -newer "$stop" 2>/dev/null
  find /tmp/ray -maxdepth 1 -name 'session_2*' -newer "$stop" -exec \
    grep -hE "OOM|out of memory|Killing worker|memory monitor" {}/logs/raylet.out \; 2>/dev/null |
    tail -n 20
  # tests/conftest.py registers a SIGUSR1 handler that dumps every thread's stack to
  # test-output/stacks/PID.txt: only processes that did are sent the signal.
  for p in $pids; do
    [ -e "$stacks/$p.txt" ] && kill -USR1 "$p" 2>/dev/null
  done
  sleep 3
  for p in $pids; do
    if [ -s "$stacks/$p.txt" ]; then
      echo "-- thread stacks of pid $p: $(ps -o args= -p "$p" | cut -c1-160)"
      cat "$stacks/$p.txt"
    fi
  done
} >>"$report" 2>&1
echo "hang guard: $name ran past ${limit} s; ending it (what it was doing: $report)" >&2
# shellcheck disable=SC2086
kill -TERM $pids 2>/dev/null
sleep 20
# shellcheck disable=SC2086
kill -KILL $(descendants "$shell") 2>/dev/null
exit 0
