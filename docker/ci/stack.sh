# shellcheck shell=bash
# docker/ci-e2e.sh, sourced: Step 4: certificates, and the compose stack up with TLS, SuperNode auth and the clients.

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
