#!/usr/bin/env bash
# End-to-end check of the docker-compose deployment, run by CI (.ci/run) as root.
#
#   bash docker/ci-e2e.sh
#
# 1. installs Docker from Debian's packages (docker.io, docker-compose) and
#    debootstrap/openssh-client/openssl if missing; starts dockerd if none runs;
# 2. builds a base image without any registry (docker/base-image.sh:
#    debootstrap bookworm + python3 + python3-venv, then `docker import`);
# 3. makes a wheelhouse on the host (docker/wheelhouse.sh, `pip download` of
#    cp311 manylinux wheels) and builds the superlink and supernode images from
#    it, served over loopback (no package index inside the build);
# 4. makes a CA, server certificate and 3 SuperNode keys (docker/make-certs.sh),
#    brings the stack up with TLS, SuperNode authentication and 3 clients;
# 5. runs the app for 2 rounds with distillation and local DP on a mixed fleet
#    (2 clients train the large CNN, 1 the small one; one-shot `runner` service),
#    checks that each model family improved on the server's test set, that
#    the run ended `finished:completed` (also from the host's flwr CLI
#    when there is one), that the outputs are on the `outputs` volume, and that
#    every client's tasks ran on its warm executor (FLD_EXECUTOR=warm, forked
#    from the warm parent, not fresh flwr-clientapp processes);
# 6. shows that a SuperNode with an unregistered key is refused, that the
#    SuperLink remembers the run across a restart (--database on a volume), and
#    that after the restart the clients rejoin and `resume-from="outputs/<run>"`
#    continues the run for one more round in its folder;
# 7. `down -v`, removes the images, build cache and files it made, and stops
#    dockerd if it started it (also on failure, via a trap).
# Exits non-zero on any failure. This file holds the settings and the cleanup;
# the steps are in docker/ci/{tools,images,stack,run,security}.sh.
#
# Duration on the 2-core CI machine, from nothing (Docker install included):
# 8-14 min (measured 498 s and 838 s): debootstrap + wheelhouse 2-4 min (mirror
# speed), the CUDA-torch dependency layer 3-5 min, the 2-round run 2.5-3.5 min.
#
# Env knobs: E2E_CLIENTS (3), E2E_ROUNDS (2), E2E_RUN_CONFIG (extra run-config
#   `key=value ...`), E2E_RUN_TIMEOUT (1800 s), E2E_APP_DIR (submit this app
#   folder instead of the image's /app, e.g. a placeholder), E2E_KEEP_IMAGES=1
#   (keep images, base image and wheelhouse for a faster next run),
#   E2E_WHEELHOUSE (wheelhouse folder, default docker/wheelhouse).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

export PATH=$PATH:/usr/sbin:/sbin   # dockerd, debootstrap
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

CLIENTS=${E2E_CLIENTS:-3}
ROUNDS=${E2E_ROUNDS:-2}
RUN_TIMEOUT=${E2E_RUN_TIMEOUT:-1800}
PROJECT=fld-e2e
export FLD_TAG=e2e FLD_IMAGE_PREFIX=fl-distill
SUPERLINK_IMAGE=$FLD_IMAGE_PREFIX-superlink:$FLD_TAG
SUPERNODE_IMAGE=$FLD_IMAGE_PREFIX-supernode:$FLD_TAG
BASE_TAG=fl-distill/base:bookworm-py311
FLEET_PORT=19092 CONTROL_PORT=18000 WHEEL_PORT=18765
export FLD_FLEET_PUBLISH=127.0.0.1:$FLEET_PORT FLD_CONTROL_PUBLISH=127.0.0.1:$CONTROL_PORT
WHEELHOUSE=${E2E_WHEELHOUSE:-$here/wheelhouse}
EXPECTED_OUTPUTS="metrics.jsonl summary.json global.safetensors student.safetensors student.onnx student.int8.onnx devices.json"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/fld-e2e.XXXXXX")
export FLD_CERTS_DIR=$work/certs
t0=$SECONDS
declare -a timings=()
step_name="" step_t0=0
step() {
    [ -n "$step_name" ] && timings+=("$(printf '%5ds  %s' $((SECONDS - step_t0)) "$step_name")")
    step_name=$1 step_t0=$SECONDS
    printf '\n=== [%4ds] %s\n' $((SECONDS - t0)) "$1"
}
fail() { echo "ci-e2e: FAIL: $*" >&2; exit 1; }

started_dockerd=0 dockerd_pid="" http_pid="" made_wheelhouse=0 made_base=0 compose_up=0
bg_pids=()   # background helpers of a part (e.g. fleet.sh's memory sampler), stopped by cleanup
COMPOSE=()
compose() {
    "${COMPOSE[@]}" -p "$PROJECT" -f "$here/docker-compose.yml" "$@"
}

cleanup() {
    local rc=$?
    set +e
    timings+=("$(printf '%5ds  %s' $((SECONDS - step_t0)) "$step_name")")
    printf '\n=== [%4ds] cleanup (exit status so far: %d)\n' $((SECONDS - t0)) "$rc"
    if [ "$compose_up" = 1 ]; then
        if [ "$rc" != 0 ]; then
            echo "--- compose ps / logs (last 150 lines per service) ---"
            compose ps
            compose logs --no-color --tail=150
        fi
        compose --profile run down -v --remove-orphans --timeout 20 >/dev/null 2>&1
        docker rm -f "$PROJECT-rogue" >/dev/null 2>&1
    fi
    for pid in ${bg_pids[@]+"${bg_pids[@]}"}; do kill "$pid" 2>/dev/null; done
    [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null && wait "$http_pid" 2>/dev/null
    if docker info >/dev/null 2>&1 && [ "${E2E_KEEP_IMAGES:-0}" != 1 ]; then
        docker rmi -f "$SUPERLINK_IMAGE" "$SUPERNODE_IMAGE" >/dev/null 2>&1
        [ "$made_base" = 1 ] && docker rmi -f "$BASE_TAG" >/dev/null 2>&1
        docker builder prune -af >/dev/null 2>&1
        docker image prune -f >/dev/null 2>&1
    fi
    if [ "$made_wheelhouse" = 1 ] && [ "${E2E_KEEP_IMAGES:-0}" != 1 ]; then rm -rf "$WHEELHOUSE"; fi
    if [ "$started_dockerd" = 1 ]; then
        echo "stopping dockerd (pid $dockerd_pid)"
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 1 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$dockerd_pid" 2>/dev/null
    fi
    rm -rf "$work"
    echo
    echo "=== step durations"
    printf '%s\n' "${timings[@]}"
    printf '%5ds  total\n' $((SECONDS - t0))
    if [ "$rc" = 0 ]; then echo "ci-e2e: PASS"; else echo "ci-e2e: FAIL (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The steps, in order; each file is sourced and shares this script's variables. E2E_PARTS picks others,
# e.g. "tools images fleet" (docker/ci/fleet.sh: many SuperNodes on this host, with its table).
# shellcheck source=ci/lib.sh
. "$here/ci/lib.sh"
for part in ${E2E_PARTS:-tools images stack run security}; do
    [ "$part" != lib ] && [ -f "$here/ci/$part.sh" ] || fail "E2E_PARTS names '$part'; use: tools images stack run security fleet"
    # shellcheck source=/dev/null
    . "$here/ci/$part.sh"
done
