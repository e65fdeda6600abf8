#!/usr/bin/env bash
# Build a minimal Debian bookworm image with python3 + python3-venv WITHOUT any
# container registry: debootstrap a root filesystem, then `docker import` it.
#
# Use it where no registry is reachable (CI here); elsewhere the images just
# build FROM the default BASE_IMAGE (python:3.11-slim-bookworm).
#
#   sudo bash docker/base-image.sh [TAG]        # default tag: fl-distill/base:bookworm-py311
#
# Env: DEBIAN_MIRROR (default http://deb.debian.org/debian), SUITE (bookworm),
#      FORCE=1 to rebuild an existing tag, DOCKER (docker CLI to use).
# Needs root and the `debootstrap` package. Takes about 1-2 minutes.
set -euo pipefail

TAG=${1:-${BASE_IMAGE_TAG:-fl-distill/base:bookworm-py311}}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if [ "${FORCE:-0}" != 1 ] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "base-image: $TAG already exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "base-image: must run as root (debootstrap)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/var/tmp}/fld-rootfs.XXXXXX")
rootfs="$work/rootfs"
umount_rootfs() {
    # debootstrap unmounts what it mounted; be defensive before deleting.
    local m
    for m in proc sys dev/pts dev; do
        if mountpoint -q "$rootfs/$m" 2>/dev/null; then umount -l "$rootfs/$m" || true; fi
    done
}
cleanup() {
    umount_rootfs
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

echo "base-image: debootstrap $SUITE from $MIRROR"
for attempt in 1 2; do
    if debootstrap --variant=minbase --components=main \
        --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
        break
    fi
    tail -30 "$work/debootstrap.log" >&2
    [ "$attempt" = 2 ] && { echo "base-image: debootstrap failed" >&2; exit 1; }
    echo "base-image: debootstrap failed; retrying once" >&2
    umount_rootfs
    rm -rf --one-file-system "$rootfs"
done

# Slim the tree the way the official slim images do: no apt lists, docs, man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
# Keep the image's resolv.conf/hostname empty: Docker bind-mounts its own.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

echo "base-image: docker import -> $TAG"
tar -C "$rootfs" --numeric-owner -c . | $DOCKER import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
$DOCKER run --rm "$TAG" python3 -c 'import sys, venv, ssl; print("base-image: ok, python", sys.version.split()[0])'
