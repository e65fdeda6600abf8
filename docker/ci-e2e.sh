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
# 5. runs the app for 2 rounds with distillation (one-shot `runner` service),
#    checks the run ended `finished:completed` (also from the host's flwr CLI
#    when there is one) and that the outputs are on the `outputs` volume;
# 6. shows that a SuperNode with an unregistered key is refused, and that the
#    SuperLink remembers the run across a restart (--database on a volume);
# 7. `down -v`, removes the images, build cache and files it made, and stops
#    dockerd if it started it (also on failure, via a trap).
# Exits non-zero on any failure.
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
EXPECTED_OUTPUTS="metrics.jsonl summary.json global.safetensors student.safetensors"

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

# ---------------------------------------------------------------------------
step "tools: docker.io, docker-compose, debootstrap, openssh-client, openssl"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v openssl >/dev/null || need+=(openssl)
[ -e /usr/bin/docker-init ] || [ -e /usr/libexec/docker/docker-init ] || need+=(tini)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >"$work/apt.log" 2>&1 \
        || { tail -20 "$work/apt.log"; fail "apt-get install ${need[*]}"; }
fi
hash -r   # forget command paths looked up before the install
# A docker CLI >= 23 without the buildx plugin cannot build with BuildKit (some
# machines have such a static CLI in /usr/local/bin); Debian's 20.10 CLI can.
if [ "$(command -v docker)" != /usr/bin/docker ] && [ -x /usr/bin/docker ] \
    && ! docker buildx version >/dev/null 2>&1; then
    mkdir -p "$work/bin" && ln -s /usr/bin/docker "$work/bin/docker"
    export PATH=$work/bin:$PATH
    hash -r
fi
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
echo "docker CLI: $(command -v docker) ($(docker --version)); compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true))"

step "dockerd"
if docker info >/dev/null 2>&1; then
    echo "using the running Docker daemon"
else
    dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$! started_dockerd=1
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -30 "$work/dockerd.log"; fail "dockerd did not start"; }
    echo "started dockerd (pid $dockerd_pid)"
fi
echo "daemon: $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"

# ---------------------------------------------------------------------------
step "base image (debootstrap bookworm + python3 -> docker import) and, meanwhile, wheelhouse (pip download)"
docker image inspect "$BASE_TAG" >/dev/null 2>&1 || made_base=1
[ -d "$WHEELHOUSE" ] || made_wheelhouse=1
bash "$here/wheelhouse.sh" "$WHEELHOUSE" >"$work/wheelhouse.log" 2>&1 &
wheel_pid=$!
bash "$here/base-image.sh" "$BASE_TAG" || { wait "$wheel_pid"; fail "base image"; }
wait "$wheel_pid" || { cat "$work/wheelhouse.log"; fail "wheelhouse"; }
grep -v "^  " "$work/wheelhouse.log" | grep -v "^WARNING: Location" || true

step "build images from the wheelhouse (served on 127.0.0.1:$WHEEL_PORT)"
python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELHOUSE" >"$work/http.log" 2>&1 &
http_pid=$!
for _ in $(seq 1 30); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$WHEEL_PORT/')" 2>/dev/null && break; sleep 0.5; done
build_args=(--network host --build-arg "BASE_IMAGE=$BASE_TAG"
            --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$WHEEL_PORT/")
for target in superlink supernode; do
    tb=$SECONDS
    docker build --progress=plain "${build_args[@]}" -f "$here/Dockerfile" --target "$target" \
        -t "$FLD_IMAGE_PREFIX-$target:$FLD_TAG" "$repo" >"$work/build-$target.log" 2>&1 \
        || { tail -40 "$work/build-$target.log"; fail "docker build --target $target"; }
    grep -h "install-deps: flwr" "$work/build-$target.log" | sed 's/^#[0-9]* [0-9.]* //' || true
    echo "built $FLD_IMAGE_PREFIX-$target:$FLD_TAG in $((SECONDS - tb))s," \
        "$(docker image inspect -f '{{.Size}}' "$FLD_IMAGE_PREFIX-$target:$FLD_TAG" | awk '{printf "%.2f GB", $1/1e9}')"
done
kill "$http_pid" 2>/dev/null; wait "$http_pid" 2>/dev/null || true; http_pid=""
docker run --rm --entrypoint python "$SUPERNODE_IMAGE" -c \
    "import torch, flwr; print('supernode image: torch', torch.__version__, 'cuda build', torch.version.cuda, 'cuda available here', torch.cuda.is_available())"

# ---------------------------------------------------------------------------
step "certificates: CA, server cert, $CLIENTS SuperNode keys (+1 unregistered key)"
bash "$here/make-certs.sh" -n "$CLIENTS" "$FLD_CERTS_DIR"
openssl x509 -in "$FLD_CERTS_DIR/superlink/server.pem" -noout -ext subjectAltName | tail -1
mkdir -p "$work/rogue"
cp "$FLD_CERTS_DIR/ca.crt" "$work/rogue/ca.crt"
ssh-keygen -q -t ecdsa -b 384 -N "" -C rogue -f "$work/rogue/rogue.key"

step "compose up: superlink (TLS + SuperNode auth) + register + $CLIENTS clients"
compose_up=1
compose up -d --no-build --scale "client=$CLIENTS"
deadline=$((SECONDS + 300))
while :; do
    reg=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -q register)" 2>/dev/null || echo "missing")
    running=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=client" --filter status=running | wc -l)
    [ "$reg" = "exited 0" ] && [ "$running" -ge "$CLIENTS" ] && break
    case "$reg" in exited\ [1-9]*) compose logs register; fail "register service: $reg" ;; esac
    [ $SECONDS -lt $deadline ] || fail "stack not up after 300s (register: $reg, clients running: $running)"
    sleep 2
done
compose logs --no-color register | grep -E "registered|done" || true
superlink_logs=$(compose logs --no-color superlink)
grep -q -- "--enable-supernode-auth" <<<"$superlink_logs" || fail "superlink not started with --enable-supernode-auth"
grep -q -- "--ssl-certfile" <<<"$superlink_logs" || fail "superlink not started with TLS"
echo "superlink runs with TLS and --enable-supernode-auth; $running clients running"

# ---------------------------------------------------------------------------
step "run: $ROUNDS rounds with distillation on $CLIENTS clients (one-shot runner)"
run_extra=()
if [ -n "${E2E_APP_DIR:-}" ]; then
    run_extra=(-v "$(cd "$E2E_APP_DIR" && pwd):/e2e-app:ro" -e FLD_APP_DIR=/e2e-app)
    echo "submitting $E2E_APP_DIR instead of the image's /app"
fi
export FLD_RUN_CONFIG="num-server-rounds=$ROUNDS min-nodes=$CLIENTS distill=\"global\" ${E2E_RUN_CONFIG:-}"
export FLD_WAIT_FOR_NODES=$CLIENTS FLD_RUN_TIMEOUT=$RUN_TIMEOUT
echo "run config: $FLD_RUN_CONFIG"
set +e
timeout $((RUN_TIMEOUT + 300)) "${COMPOSE[@]}" -p "$PROJECT" -f "$here/docker-compose.yml" \
    --profile run run --rm -T "${run_extra[@]}" runner 2>&1 | tee "$work/run.log"
run_rc=${PIPESTATUS[0]}
set -e
run_id=$(sed -n 's/.*FLD_RUN_ID=\([0-9]*\) .*/\1/p' "$work/run.log" | tail -1)
status=$(sed -n 's/.*FLD_RUN_STATUS=\([^ ]*\).*/\1/p' "$work/run.log" | tail -1)
[ -n "$run_id" ] || fail "no run id from the runner (exit $run_rc)"
[ "$run_rc" = 0 ] && [ "$status" = "finished:completed" ] \
    || fail "run $run_id ended '$status' (runner exit $run_rc)"
echo "run $run_id: $status"

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
    echo '--- metrics.jsonl (last 3 lines)'; tail -n 3 metrics.jsonl | cut -c1-400
" || fail "outputs of run $run_id incomplete on the volume"

# ---------------------------------------------------------------------------
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

step "compose down -v"
compose --profile run down -v --remove-orphans --timeout 20
compose_up=0
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left" = 0 ] || fail "$left volumes left after down -v"
echo "stack and volumes removed"
