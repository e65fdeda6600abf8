# Shared helpers for the fl-distill container entrypoints (sourced, not run).
# shellcheck shell=bash

FLD_CERTS_DIR=${FLD_CERTS_DIR:-/certs}
FLD_SECRETS_DIR=${FLD_SECRETS_DIR:-/run/fld}
FLD_CONNECTION=${FLD_CONNECTION:-fl-distill}

log() { echo "[$(basename "$0")] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_true() { case "${1:-}" in 1 | true | TRUE | True | yes | on) return 0 ;; *) return 1 ;; esac; }

# FLD_INSECURE=1 only comes from docker-compose.insecure-dev.yml (or by hand).
insecure() { is_true "${FLD_INSECURE:-0}"; }

am_root() { [ "$(id -u)" = 0 ]; }

# Copy a secret (e.g. a 0600 key bind-mounted from the host) to a private file
# the unprivileged user can read. Prints the new path.
private_copy() {
    local src=$1 name=$2
    [ -r "$src" ] || die "cannot read $src (is the certs folder mounted? run docker/make-certs.sh)"
    mkdir -p "$FLD_SECRETS_DIR"
    if am_root; then
        chown flwr:flwr "$FLD_SECRETS_DIR" && chmod 0700 "$FLD_SECRETS_DIR"
        install -o flwr -g flwr -m 0600 "$src" "$FLD_SECRETS_DIR/$name"
    else
        install -m 0600 "$src" "$FLD_SECRETS_DIR/$name"
    fi
    echo "$FLD_SECRETS_DIR/$name"
}

# Make writable folders (volumes or host bind mounts) usable by the app user.
own_dirs() {
    if am_root; then
        local d
        for d in "$@"; do mkdir -p "$d" && chown flwr:flwr "$d" 2>/dev/null || true; done
    fi
}

# exec the command as the unprivileged `flwr` user when started as root.
exec_app() {
    export HOME=/home/flwr
    if am_root && ! is_true "${FLD_RUN_AS_ROOT:-0}"; then
        exec setpriv --reuid=flwr --regid=flwr --init-groups -- "$@"
    fi
    exec "$@"
}

# Write a flwr CLI config ($FLWR_HOME/config.toml) with one connection named
# $FLD_CONNECTION to the SuperLink Control API at $1.
write_cli_config() {
    local address=$1
    export FLWR_HOME=${FLWR_HOME:-$(mktemp -d /tmp/flwr-home.XXXXXX)}
    mkdir -p "$FLWR_HOME"
    {
        echo "[superlink]"
        echo "default = \"$FLD_CONNECTION\""
        echo
        echo "[superlink.$FLD_CONNECTION]"
        echo "address = \"$address\""
        if insecure; then
            echo "insecure = true"
        else
            [ -r "$FLD_CERTS_DIR/ca.crt" ] || die "no CA certificate at $FLD_CERTS_DIR/ca.crt"
            echo "root-certificates = \"$FLD_CERTS_DIR/ca.crt\""
        fi
    } >"$FLWR_HOME/config.toml"
}

# Wait until the Control API at host:port accepts TCP connections.
wait_tcp() {
    local hostport=$1 timeout=${2:-120}
    python3 - "$hostport" "$timeout" <<'PY' || die "timed out waiting for $hostport"
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.time() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(1)
PY
}
