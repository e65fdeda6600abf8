# shellcheck shell=bash
# docker/ci-e2e.sh, sourced: Steps 2-3: base image (debootstrap), wheelhouse, superlink and supernode images.

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
