# Sourced by run.sh, test.sh and .ci/run: a project-local venv and Flower home.
if [ ! -x .venv/bin/flwr ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "fl-distill: installing into .venv (first run takes a few minutes) ..."
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,onnx,dp,mnist5k,cluster]'
  touch .venv/.installed
fi
source .venv/bin/activate
export FLWR_HOME="$PWD/.flwr" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
