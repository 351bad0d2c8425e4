#!/usr/bin/env bash
# The test command: as root on a fresh Debian/Ubuntu machine with this
# repository checked out, install what the tests need and run them.
#
#   bash scripts/test.sh                      # the suite CI runs
#   bash scripts/test.sh tests/unit -x        # extra arguments go to pytest
#
# Needs Python >= 3.11 (Debian 12, Ubuntu 24.04 or later).  CI (.ci/run) calls
# exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (the agent under test uses ptrace on other users' processes)" >&2
  exit 2
fi

echo "== apt packages (Python, compilers, gdb, elfutils, lldb, iproute2, FUSE 3)"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  python3 python3-pip python3-venv ca-certificates \
  gcc gcc-multilib libc6-dev-i386 gdb elfutils lldb iproute2 procps systemd apparmor \
  fuse3 libfuse3-3 >/dev/null

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"scripts/test.sh: corepeek needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

echo "== python packages (in .venv: a distribution's own Python stays untouched, PEP 668)"
# --system-site-packages: what the machine already has installed is reused.
[ -x .venv/bin/python3 ] || python3 -m venv --system-site-packages .venv
export PATH="$PWD/.venv/bin:$PATH"          # python3 and the corepeek entry point
python3 -m pip install -q -e '.[test]'

echo "== tests"
exec python3 -m pytest -q -m "not slow" tests "$@"
