#!/usr/bin/env bash
# README's test command: set up .venv if needed, then run the whole test suite
# (unit tests, a simulated run, and SuperLink + 3 SuperNodes as real processes).
# Extra arguments go to pytest, e.g. `./test.sh -m "not slow"` for the quick ones.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec python -m pytest "$@"
