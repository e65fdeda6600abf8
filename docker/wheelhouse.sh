#!/usr/bin/env bash
# Download every wheel the images need into a local wheelhouse (no internet needed
# at image-build time afterwards). Wheels are for CPython 3.11 / manylinux x86_64,
# i.e. for the images, whatever Python the host runs.
#
#   bash docker/wheelhouse.sh [DEST]      # default: docker/wheelhouse
#
# Then build with the wheelhouse served over loopback (see docker/README.md):
#   python3 -m http.server 8765 --bind 127.0.0.1 --directory docker/wheelhouse &
#   docker build --network host --build-arg PIP_NO_INDEX=1 \
#       --build-arg PIP_FIND_LINKS=http://127.0.0.1:8765/ ...
#
# Env: PYTHON (host python with pip, default python3), GLIBC_MINOR (newest glibc
#      of the images, default 36 = Debian bookworm; every older manylinux tag is
#      accepted too, since pip does not expand --platform by itself).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
dest=${1:-$here/wheelhouse}
PYTHON=${PYTHON:-python3}
GLIBC_MINOR=${GLIBC_MINOR:-36}
platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for ((i = 5; i <= GLIBC_MINOR; i++)); do platforms+=(--platform "manylinux_2_${i}_x86_64"); done

mkdir -p "$dest"
"$PYTHON" "$here/image-requirements.py" "$repo/pyproject.toml" >"$dest/requirements.txt"
echo "wheelhouse: requirements:"; sed 's/^/  /' "$dest/requirements.txt"
"$PYTHON" -m pip download --quiet --dest "$dest" \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --abi cp311 --abi abi3 --abi none "${platforms[@]}" \
    -r "$dest/requirements.txt" \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
n=$(find "$dest" -maxdepth 1 -name '*.whl' | wc -l)
echo "wheelhouse: $n wheels, $(du -sh "$dest" | cut -f1) in $dest"
