#!/usr/bin/env bash
# The main job on one machine: start an agent on a local Unix socket, start a
# real multi-threaded program, pull its core through the agent, and show what
# gdb sees in it.  Needs root (the agent uses ptrace) and gcc + gdb.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/corepeek-demo.XXXXXX)
sock="$work/agent.sock"
cleanup() {
  [[ -n "${target:-}" ]] && kill "$target" 2>/dev/null || true
  [[ -n "${agent:-}" ]] && kill "$agent" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

gcc -g -O0 -pthread -o "$work/demo_target" demo/demo_target.c
python3 -m corepeek agent --listen "unix:$sock" 2>"$work/agent.log" &
agent=$!
"$work/demo_target" >"$work/target.out" &
target=$!
for _ in $(seq 100); do [[ -S "$sock" ]] && break; sleep 0.1; done
sleep 0.3

echo "== processes named demo_target on the agent's host"
python3 -m corepeek ps --agent "unix:$sock" --comm demo_target
echo
echo "== capturing pid $target"
python3 -m corepeek dump --agent "unix:$sock" "$target" -o "$work/demo.core"
echo
echo "== the target after the capture: $(grep -E '^State' /proc/$target/status)," \
     "$(grep -E '^TracerPid' /proc/$target/status)"
echo
echo "== gdb on the pulled core"
gdb -batch -nx -ex 'set pagination off' -ex 'info threads' -ex 'thread apply all bt' \
    -ex 'print demo_message' "$work/demo_target" "$work/demo.core" 2>&1 \
  | grep -v -E '^(warning: Section|warning: File|To enable|	add-auto|line to your|To completely|	set auto-load|For more information|	info "\(gdb\))'
echo
echo "core file: $work/demo.core (agent log: $work/agent.log)"
