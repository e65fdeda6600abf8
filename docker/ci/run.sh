# shellcheck shell=bash
# docker/ci-e2e.sh, sourced: Step 5: the run, its status (also from the host's flwr CLI), outputs, the warm executor's task log.

step "run: $ROUNDS rounds with distillation on $CLIENTS clients, model families large and small (one-shot runner)"
run_extra=()
if [ -n "${E2E_APP_DIR:-}" ]; then
    run_extra=(-v "$(cd "$E2E_APP_DIR" && pwd):/e2e-app:ro" -e FLD_APP_DIR=/e2e-app)
    echo "submitting $E2E_APP_DIR instead of the image's /app"
fi
# Local DP on: the mod runs in every client container, the accountant in the SuperLink's (the dp extra);
# noise small enough to learn in 2 rounds. A mixed fleet: the node given the last partition trains the
# small CNN (small-partitions), the others the large one; each family is checked to improve below.
SMALL_PARTITION=$((CLIENTS - 1))
export FLD_RUN_CONFIG="num-server-rounds=$ROUNDS min-nodes=$CLIENTS distill=\"global\" dp=\"local\" dp-clipping-norm=1 dp-local-epsilon=1000 model-families=\"large,small\" small-partitions=\"$SMALL_PARTITION\" ${E2E_RUN_CONFIG:-}"
export FLD_WAIT_FOR_NODES=$CLIENTS FLD_RUN_TIMEOUT=$RUN_TIMEOUT
submit_run "$work/run.log"

flwr_net() {  # flwr CLI inside the compose network, with the CA; args: flwr arguments
    docker run --rm --network "${PROJECT}_default" -v "$FLD_CERTS_DIR/public:/certs:ro" \
        --entrypoint bash "$SUPERLINK_IMAGE" -c \
        '. /usr/local/bin/fld-lib.sh; write_cli_config superlink:8000; flwr "$@"' flwr "$@"
}

host_flwr=""
for c in "$repo/.venv/bin/flwr" "$(command -v flwr || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { host_flwr=$c; break; }
done
if [ -n "$host_flwr" ]; then
    step "host flwr CLI -> Control API on 127.0.0.1:$CONTROL_PORT (TLS, CA from make-certs)"
    export FLWR_HOME=$work/flwr-home
    mkdir -p "$FLWR_HOME"
    cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fl-distill-e2e"

[superlink.fl-distill-e2e]
address = "127.0.0.1:$CONTROL_PORT"
root-certificates = "$FLD_CERTS_DIR/ca.crt"
EOF
    host_status=$("$host_flwr" ls fl-distill-e2e --run-id "$run_id" --format json \
        | python3 -c "import json,sys; print(json.load(sys.stdin)['runs'][0]['status'])")
    echo "host: flwr ls --run-id $run_id -> $host_status"
    [ "$host_status" = "finished:completed" ] || fail "host CLI sees run $run_id as '$host_status'"
fi

step "outputs on the '${PROJECT}_outputs' volume"
docker run --rm -v "${PROJECT}_outputs:/outputs:ro" --entrypoint bash "$SUPERLINK_IMAGE" -c "
    set -e; cd /outputs/$run_id; ls -l
    for f in $EXPECTED_OUTPUTS; do test -s \"\$f\" || { echo \"missing or empty: \$f\"; exit 1; }; done
    echo '--- summary.json'; head -c 1500 summary.json; echo
    grep -q '\"mechanism\": \"local\"' summary.json || { echo 'no local-DP epsilon in summary.json'; exit 1; }
    echo '--- metrics.jsonl (last 3 lines)'; tail -n 3 metrics.jsonl | cut -c1-400
" || fail "outputs of run $run_id incomplete on the volume"

step "model families: each family's global model improved on the server's test set"
docker run --rm -v "${PROJECT}_outputs:/outputs:ro" --entrypoint python "$SUPERLINK_IMAGE" -c '
import json, sys
rows = [json.loads(line) for line in open(f"/outputs/{sys.argv[1]}/metrics.jsonl")]
first, last = rows[0]["families"], rows[-1]["families"]
for family in ("large", "small"):
    before, after = first[family]["accuracy"], last[family]["accuracy"]
    valid, received = last[family]["valid"], last[family]["bytes-received"]
    print(f"{family}: test acc {before:.3f} at round 0 -> {after:.3f} at round {len(rows) - 1}, "
          f"{valid} valid replies, {received} bytes received in the last round")
    assert valid >= 1, f"no valid {family} reply in the last round"
    assert after > before + 0.2, f"the {family} family did not improve"
' "$run_id" || fail "a model family of run $run_id did not improve"

step "warm executor: every ClientApp task forked from its client's warm parent"
client_logs=$(compose logs --no-color client)
warm_tasks=$(grep -c "run $run_id train: .*forked from the warm parent" <<<"$client_logs" || true)
ready=$(grep -c "fl-distill-executor: warm parent .* ready" <<<"$client_logs" || true)
grep "fl-distill-executor: task .* run $run_id " <<<"$client_logs" | sed 's/.*fl-distill-executor: //' | head -n 12
echo "$ready warm executors; $warm_tasks train tasks of run $run_id on them (expected $((CLIENTS * ROUNDS)))"
[ "$ready" -ge "$CLIENTS" ] || fail "only $ready of $CLIENTS clients started a warm executor"
[ "$warm_tasks" -eq $((CLIENTS * ROUNDS)) ] || fail "$warm_tasks warm train tasks, expected $((CLIENTS * ROUNDS))"
! grep -q "NOT from the warm parent" <<<"$client_logs" || fail "a task did not run on the warm parent"
! grep -q "run $run_id .*NO REPLY" <<<"$client_logs" || fail "a task of run $run_id ended without pushing its reply"

step "delivered models: every client holds the student, matching its manifest, loadable by onnxruntime alone"
# Checked with hashlib, json and onnxruntime only: the files must not need this project's code.
for i in $(seq 1 "$CLIENTS"); do
    compose exec -T --index "$i" client python -c '
import hashlib, json, pathlib, sys
import numpy as np, onnxruntime as ort
folder = pathlib.Path("/srv/flwr/models") / f"replica-{sys.argv[1]}" / "current"
manifest = json.loads((folder / "manifest.json").read_text())
for name, meta in manifest["files"].items():
    data = (folder / name).read_bytes()
    assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name
for name in ("student.onnx", "student.int8.onnx"):
    session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((2, *manifest["input-shape"]), np.float32)})[0]
    assert logits.shape == (2, len(manifest["class-names"])), logits.shape
print(folder, sorted(manifest["files"]), "match the manifest of run", manifest["run-id"], "round", manifest["round"])
' "$i" || fail "client replica $i holds no complete, loadable student"
done
installed=$(docker run --rm -v "${PROJECT}_outputs:/outputs:ro" --entrypoint python "$SUPERLINK_IMAGE" -c \
    "import json; print(sum(r['status'] == 'installed' for r in json.load(open('/outputs/$run_id/devices.json'))))")
echo "devices.json: installed on $installed of $CLIENTS nodes"
[ "$installed" -eq "$CLIENTS" ] || fail "devices.json lists $installed installed nodes, expected $CLIENTS"
