# shellcheck shell=bash
# docker/ci-e2e.sh, sourced when E2E_PARTS names it (after tools and images): many SuperNodes on this host.
#
#   E2E_PARTS="tools images fleet" E2E_FLEET="10 50 100" E2E_NODES_PER_CLIENT=10 bash docker/ci-e2e.sh
#
# For each fleet size N in E2E_FLEET: N keys (make-certs.sh), the stack up with TLS and SuperNode
# authentication (the SuperLink's state in memory: E2E_FLEET_DATABASE, see below) and N / K client replicas of K SuperNodes each (FLD_NODES=K: one process and one warm
# parent per replica), the N keys registered; once every node has connected and every warm parent is
# ready, the host's used memory over the idle host (before `up`); then a run of E2E_ROUNDS rounds in which
# every node trains (1 local epoch, the student distilled, no delivery), its round seconds from
# metrics.jsonl and the peak memory; then `down -v`. Prints a table and writes it to E2E_FLEET_OUT.

K=${E2E_NODES_PER_CLIENT:-10}
# Flower 1.39's SQLite state answers "database is locked" (INTERNAL to the SuperNodes, a failed run) with 50
# busy nodes on two cores; in memory it holds 100 (registrations are redone after each `down -v` anyway).
export FLD_DATABASE=${E2E_FLEET_DATABASE:-:flwr-in-memory:}
FLEET_TABLE=${E2E_FLEET_OUT:-$work/fleet.tsv}
used_mb() { awk '/^MemTotal/ {t=$2} /^MemAvailable/ {a=$2} END {printf "%d", (t - a) / 1024}' /proc/meminfo; }
printf 'nodes\treplicas\tidle_mb\tpeak_mb\tround_s\ttrained\tconnect_s\n' >"$FLEET_TABLE"

for N in ${E2E_FLEET:-10 50 100}; do
    replicas=$(((N + K - 1) / K))
    step "fleet: $N SuperNodes in $replicas replicas of $K (TLS + SuperNode auth)"
    bash "$here/make-certs.sh" -n "$N" "$FLD_CERTS_DIR" >/dev/null
    sleep 5
    idle=$(used_mb)
    compose_up=1 t_up=$SECONDS
    FLD_NODES=$K compose up -d --no-build --scale "client=$replicas"
    deadline=$((SECONDS + 300 + 6 * N))
    while :; do
        logs=$(compose logs --no-color client 2>/dev/null)
        ids=$(grep -c "SuperNode ID: [0-9]" <<<"$logs" || true)
        warm=$(grep -c "fl-distill-executor: warm parent .* ready" <<<"$logs" || true)
        [ "$ids" -ge "$N" ] && [ "$warm" -ge "$replicas" ] && break
        [ $SECONDS -lt $deadline ] || { compose ps; fail "$ids of $N SuperNodes connected, $warm of $replicas warm parents ready"; }
        sleep 3
    done
    connect=$((SECONDS - t_up))
    sleep 20   # the nodes settle after connecting
    idle_mb=$(($(used_mb) - idle))
    echo "$N SuperNodes connected in ${connect}s; host memory over idle: ${idle_mb} MB"

    peak_file=$work/peak-$N
    echo "$idle_mb" >"$peak_file"
    ( while :; do m=$(($(used_mb) - idle)); [ "$m" -gt "$(cat "$peak_file")" ] && echo "$m" >"$peak_file"; sleep 1; done ) &
    sampler=$!
    bg_pids+=("$sampler")
    export FLD_RUN_CONFIG="num-server-rounds=$ROUNDS min-nodes=$N local-epochs=1 deliver=\"none\" ${E2E_RUN_CONFIG:-}"
    export FLD_WAIT_FOR_NODES=$N FLD_RUN_TIMEOUT=$RUN_TIMEOUT
    run_extra=()
    submit_run "$work/fleet-$N.log"
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    figures=$(docker run --rm -v "${PROJECT}_outputs:/outputs:ro" --entrypoint python "$SUPERLINK_IMAGE" -c '
import json, statistics, sys
rows = [json.loads(line) for line in open(f"/outputs/{sys.argv[1]}/metrics.jsonl")][1:]
median = statistics.median(r["round-seconds"] for r in rows)
print(f"{median:.1f}", "/".join(str(len(r["clients"])) for r in rows))
' "$run_id")
    read -r round_s trained <<<"$figures"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$N" "$replicas" "$idle_mb" "$(cat "$peak_file")" "$round_s" "$trained" \
        "$connect" >>"$FLEET_TABLE"
    echo "run $run_id: median round ${round_s}s, clients trained per round $trained, peak $(cat "$peak_file") MB over idle"
    [ "${trained%%/*}" = "$N" ] || fail "round 1 trained ${trained%%/*} of $N SuperNodes"
    compose --profile run down -v --remove-orphans --timeout 30 >/dev/null 2>&1
    compose_up=0
done

step "fleet: SuperNodes on this host, $K per client replica, TLS and SuperNode authentication on"
column -t -s $'\t' "$FLEET_TABLE"
