# shellcheck shell=bash
# docker/ci-e2e.sh, sourced: Step 1: Docker and the other host tools; a Docker daemon.

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
