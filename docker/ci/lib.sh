# shellcheck shell=bash
# docker/ci-e2e.sh, sourced before its parts: what more than one part uses.

submit_run() {  # args: log file; FLD_RUN_CONFIG set; sets run_id and status, fails unless finished:completed
    local log=$1 run_rc
    echo "run config: $FLD_RUN_CONFIG"
    set +e
    timeout $((RUN_TIMEOUT + 300)) "${COMPOSE[@]}" -p "$PROJECT" -f "$here/docker-compose.yml" \
        --profile run run --rm -T "${run_extra[@]}" runner 2>&1 | tee "$log"
    run_rc=${PIPESTATUS[0]}
    set -e
    run_id=$(sed -n 's/.*FLD_RUN_ID=\([0-9]*\) .*/\1/p' "$log" | tail -1)
    status=$(sed -n 's/.*FLD_RUN_STATUS=\([^ ]*\).*/\1/p' "$log" | tail -1)
    [ -n "$run_id" ] || fail "no run id from the runner (exit $run_rc)"
    [ "$run_rc" = 0 ] && [ "$status" = "finished:completed" ] \
        || fail "run $run_id ended '$status' (runner exit $run_rc)"
    echo "run $run_id: $status"
}
