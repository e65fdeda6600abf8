# shellcheck shell=bash
# docker/ci-e2e.sh, sourced: Steps 6-7: an unregistered key is refused; a SuperLink restart keeps the run and
# resume-from continues it; down -v.

step "a SuperNode with an unregistered key is refused"
set +e
timeout 180 docker run --name "$PROJECT-rogue" --network "${PROJECT}_default" \
    -v "$work/rogue:/certs:ro" -e FLD_AUTH_KEY=/certs/rogue.key -e FLD_SUPERLINK=superlink:9092 \
    "$SUPERNODE_IMAGE" --max-retries 3 --max-wait-time 60 >"$work/rogue.log" 2>&1
rogue_rc=$?
set -e
docker rm -f "$PROJECT-rogue" >/dev/null 2>&1 || true
grep -A3 "Failed to initialize the connection" "$work/rogue.log" || tail -n 8 "$work/rogue.log"
[ "$rogue_rc" != 0 ] && [ "$rogue_rc" != 124 ] || fail "unregistered SuperNode was not refused (exit $rogue_rc)"
grep -q "Failed to initialize the connection" "$work/rogue.log" \
    || fail "unregistered SuperNode exited $rogue_rc without the refusal message"
nodes=$(flwr_net supernode ls --format json | python3 -c \
    "import json,sys; n=json.load(sys.stdin)['nodes']; print(len(n), sum(x['status']=='online' for x in n))")
echo "refused (exit $rogue_rc); SuperLink knows $(cut -d' ' -f1 <<<"$nodes") nodes, $(cut -d' ' -f2 <<<"$nodes") online"
[ "$(cut -d' ' -f1 <<<"$nodes")" = "$CLIENTS" ] || fail "expected $CLIENTS registered nodes, got: $nodes"

step "SuperLink restart keeps the run (--database on the state volume)"
compose restart superlink >/dev/null
for _ in $(seq 1 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$(compose ps -q superlink)")" = healthy ] && break
    sleep 2
done
after=$(flwr_net ls --run-id "$run_id" --format json \
    | python3 -c "import json,sys; print(json.load(sys.stdin)['runs'][0]['status'])")
echo "after restart: run $run_id -> $after"
[ "$after" = "finished:completed" ] || fail "run $run_id forgotten after restart ($after)"

step "after the restart, resume-from continues run $run_id for one more round in its folder"
first_run=$run_id
FLD_RUN_CONFIG="${FLD_RUN_CONFIG/num-server-rounds=$ROUNDS/num-server-rounds=$((ROUNDS + 1))} resume-from=\"outputs/$first_run\""
export FLD_RUN_CONFIG
submit_run "$work/resume.log"
lines=$(docker run --rm -v "${PROJECT}_outputs:/outputs:ro" --entrypoint bash "$SUPERLINK_IMAGE" \
    -c "wc -l < /outputs/$first_run/metrics.jsonl")
echo "outputs/$first_run/metrics.jsonl: $lines lines (rounds 0..$((ROUNDS + 1)))"
[ "$lines" = $((ROUNDS + 2)) ] || fail "resumed run did not append round $((ROUNDS + 1)) to run $first_run's metrics"

step "compose down -v"
compose --profile run down -v --remove-orphans --timeout 20
compose_up=0
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left" = 0 ] || fail "$left volumes left after down -v"
echo "stack and volumes removed"
