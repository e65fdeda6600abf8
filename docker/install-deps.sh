#!/bin/sh
# Build step of docker/Dockerfile: create /opt/venv and install the requirements.
# pip reads its sources from PIP_* build args; empty ones are dropped here.
set -eu
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST; do
    eval "val=\${$v:-}"
    if [ -z "$val" ]; then unset "$v"; else echo "install-deps: $v=$val"; fi
done
python3 -m venv /opt/venv
echo "install-deps: requirements:"; sed 's/^/  /' "$1"
/opt/venv/bin/python -m pip install --no-cache-dir --progress-bar off -r "$1"
/opt/venv/bin/python - <<'PY'
from importlib.metadata import version
import flwr, torch, torchvision, sklearn, safetensors, matplotlib, numpy
print(f"install-deps: flwr {version('flwr')}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), torchvision {torchvision.__version__}")
PY
