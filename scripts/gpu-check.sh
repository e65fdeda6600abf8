#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU (docs/gpu.md):
#   bash scripts/gpu-check.sh [--wheels DIR] [--out DIR] [--dry-run | --rehearse]
#
# On the GPU machine (PyTorch with CUDA and Python 3.12 there, this project's other dependencies not,
# no internet): installs the prepared wheels into a private folder (nothing in the machine's Python
# changes), then runs `pytest -m gpu` (tests/test_gpu.py) and `python -m bench.gpu`, and writes into
# --out (default gpu-check-out/): pytest.log, junit.xml, bench.log, gpu.json (the benchmark's figures)
# and summary.json (GPU, versions, tests passed/failed/skipped, the figures). Within 8 minutes: each step
# has its own time limit, cut to what is left of GPU_CHECK_SECONDS (default 440) for all steps together; a
# step past its limit gets SIGINT first, so pytest still writes junit.xml and stops the Flower processes.
#
# Prepare the wheels first, on a machine whose pip reaches a package index (this project's .venv):
#   .venv/bin/python -m scripts.gpu_wheels prepare .whl     # ~31 MiB: flwr 1.39 and what it needs, mlxtend,
#                                                          # this project's wheel; not torch & co., not ray
# and bring .whl along with the checkout. On a GPU machine with internet, skip that:
#   pip install -e '.[dev,mnist5k]' && bash scripts/gpu-check.sh --wheels none
#
# --dry-run, on any machine (no GPU needed): checks that the wheel folder is complete, installs it into a
# scratch folder as for CPython 3.12 on x86_64 Linux, checks that pytest collects the GPU tests and that
# each is skipped with its reason here, runs the benchmark's --smoke, and prints the commands a real run
# executes. --rehearse: the real run's steps without a GPU (the tests skip, the benchmark runs on the
# CPU), e.g. with PYTHON=/path/to/a/python/without/flwr, to try the install and every command end to end.
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/.whl OUT=$REPO/gpu-check-out DRY=0 REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels|--out)
      [ $# -ge 2 ] || { echo "gpu-check: $1 needs a value; use --wheels DIR|none, --out DIR" >&2; exit 2; }
      if [ "$1" = --wheels ]; then WHEELS=$2; else OUT=$2; fi; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) sed -n '2,/^# Exit status/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1'; use --wheels DIR|none, --out DIR, --dry-run, --rehearse" >&2; exit 2 ;;
  esac
done
[ "$DRY" = 1 ] && [ "$REHEARSE" = 1 ] && { echo "gpu-check: --dry-run or --rehearse, not both" >&2; exit 2; }
PY=${PYTHON:-python3}
[ "$DRY" = 1 ] && [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
SITE=${FL_DISTILL_GPU_SITE:-/tmp/fl-distill-gpu-site}
mkdir -p "$OUT"
rm -f "$OUT"/{wheels,install,pytest,bench}.log "$OUT"/{junit.xml,gpu.json,summary.json}  # no earlier run's results
started=$SECONDS
BUDGET=${GPU_CHECK_SECONDS:-440}  # every step together; with the rest, the check ends within 8 minutes
failed=0 failed_steps=()
step() { echo "gpu-check: [$((SECONDS - started)) s] $*"; }
run_logged() {  # LIMIT LOG COMMAND...: run with a time limit, output to the terminal and LOG
  local limit=$1 log=$2; shift 2
  local left=$((BUDGET - (SECONDS - started)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    step "FAILED: no time left of GPU_CHECK_SECONDS=$BUDGET for: $*"; failed=1; failed_steps+=("$log: not run"); return 1
  fi
  step "$*  (limit ${limit} s, log $log)"
  timeout -s INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { step "FAILED (exit $rc$([ "$rc" = 124 ] && echo ": past its $limit s")): $*"; failed=1
                     failed_steps+=("$log: exit $rc"); }
  return "$rc"
}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' ||
  { echo "gpu-check: $PY is older than Python 3.10; set PYTHON=/path/to/python3" >&2; exit 2; }

if [ "$WHEELS" != none ]; then
  [ -d "$WHEELS" ] || { echo "gpu-check: no wheel folder at $WHEELS; make it where pip reaches an index:" \
    ".venv/bin/python -m scripts.gpu_wheels prepare $WHEELS (or give --wheels none if this machine has flwr)" >&2; exit 2; }
  if [ "$DRY" = 1 ]; then
    run_logged 120 "$OUT/wheels.log" "$PY" -m scripts.gpu_wheels check "$WHEELS" || exit 1
    SCRATCH=$(mktemp -d)
    trap 'rm -rf "$SCRATCH"' EXIT
    run_logged 120 "$OUT/install.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH" \
      --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "$WHEELS"/*.whl || exit 1
    for script in flwr flower-superlink flower-supernode fl-distill-supernode; do
      [ -f "$SCRATCH/bin/$script" ] || { step "FAILED: the wheels install no $script script"; exit 1; }
    done
    step "the wheels install for CPython 3.12 on x86_64 ($(du -sm "$SCRATCH" | cut -f1) MB, scripts present)"
  else
    rm -rf "$SITE"
    run_logged 90 "$OUT/install.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
      "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
  fi
fi

TESTS=("$PY" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml "$OUT/junit.xml" tests/test_gpu.py)
BENCH=("$PY" -m bench.gpu --json "$OUT/gpu.json")
if [ "$DRY" = 1 ]; then
  run_logged 300 "$OUT/pytest.log" "${TESTS[@]}"
  "$PY" - "$OUT/junit.xml" <<'EOF' || failed=1
import sys, xml.etree.ElementTree as ET
cases = [c for c in ET.parse(sys.argv[1]).getroot().iter("testcase") if c.get("name")]
skipped = [c.find("skipped") for c in cases]
if len(skipped) < 5 or any(s is None or not s.get("message") for s in skipped):
    sys.exit(f"gpu-check: expected every GPU test skipped with its reason here; got {len(skipped)} tests")
print(f"gpu-check: {len(skipped)} GPU tests collected, each skipped here with its reason")
EOF
  run_logged 120 "$OUT/bench.log" "$PY" -m bench.gpu --smoke --device cpu --json "$OUT/gpu.json"
  step "a real run executes: ${TESTS[*]}"
  step "                     ${BENCH[*]}"
else
  timeout 120 "$PY" -c 'import torch' ||
    { echo "gpu-check: $PY cannot import torch (above); set PYTHON=/path/to/the/python/with/torch" >&2; exit 2; }
  timeout 120 "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || [ "$REHEARSE" = 1 ] ||
    { echo "gpu-check: torch sees no CUDA device here (torch.cuda.is_available() is False); nothing to check" >&2; exit 2; }
  run_logged 240 "$OUT/pytest.log" "${TESTS[@]}"
  [ "$REHEARSE" = 1 ] && BENCH+=(--datasets digits --trials 1)  # the CPU is many times slower
  run_logged 240 "$OUT/bench.log" "${BENCH[@]}"  # gets what the budget has left (gpu.json: written part by part)
fi

"$PY" - "$OUT" "$DRY" "$((SECONDS - started))" ${failed_steps[@]+"${failed_steps[@]}"} <<'EOF'
import json, pathlib, sys, xml.etree.ElementTree as ET
out, dry, seconds = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
summary = {"dry-run": dry, "seconds": seconds, "failed-steps": sys.argv[4:]}  # exit 124: stopped at its limit
try:
    import torch
    summary.update(torch=torch.__version__, cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as err:  # the summary is written whatever failed
    summary["torch"] = f"not importable: {err}"
if (out / "junit.xml").exists():
    # a test stopped at the step's limit (SIGINT) is written without a name: it is not a result
    cases = [c for c in ET.parse(out / "junit.xml").getroot().iter("testcase") if c.get("name")]
    state = lambda c: next((t for t in ("failure", "error", "skipped") if c.find(t) is not None), "passed")
    summary["tests"] = {c.get("name"): state(c) for c in cases}
if (out / "gpu.json").exists():
    summary["figures"] = json.loads((out / "gpu.json").read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
counts = {}
for s in summary.get("tests", {}).values():
    counts[s] = counts.get(s, 0) + 1
print(f"gpu-check: {out / 'summary.json'}: GPU {summary.get('gpu')}, tests {counts}, {seconds} s")
EOF
[ "$failed" = 0 ] && step "passed" || step "FAILED: see the logs in $OUT"
exit "$failed"
