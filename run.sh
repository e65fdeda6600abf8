#!/usr/bin/env bash
# README's main command: set up .venv if needed, then simulate the default run
# (10 virtual clients, digits, FedAvg + distillation) with Flower's simulation
# engine. Options: --clients N, --run-config "key=value ..." (see ./run.sh --help).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec python -m scripts.simulate "$@"
