#!/usr/bin/env bash
# README's main command: set up .venv if needed, then simulate the default run
# (10 virtual clients, digits, FedAvg + distillation) with Flower's simulation
# engine. Extra arguments go to `flwr run`, e.g. --run-config "num-server-rounds=3".
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
exec python -m scripts.simulate "$@"
