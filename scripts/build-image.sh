#!/usr/bin/env bash
# Builds the project's Dockerfile into an image without a Docker engine:
# debootstrap a minimal Debian bookworm with python3 as the base, import it as an
# OCI archive, and `buildah bud` the Dockerfile against it.
#
#   scripts/build-image.sh [--target serve|train] [--tag NAME] [--out ARCHIVE.tar]
#
# Needs root and the Debian packages buildah and debootstrap (installed here if
# missing). The base archive is cached in $SIMSERVE_IMAGE_CACHE (default
# ~/.cache/simserve-image), so rebuilds skip the ~45 s debootstrap.
# With Docker, none of this is needed: `docker build -t simserve .`.
set -euo pipefail
cd "$(dirname "$0")/.."

target=serve tag=simserve:latest out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || { echo "build-image.sh needs root (debootstrap, buildah chroot isolation)" >&2; exit 1; }
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# One storage driver for every buildah call: vfs works everywhere (no overlay mounts).
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
cache=${SIMSERVE_IMAGE_CACHE:-$HOME/.cache/simserve-image}
mkdir -p "$cache"
base="$cache/bookworm-python3.oci.tar"

if [ ! -s "$base" ]; then
  echo "== debootstrap bookworm (minbase + python3) -> $base" >&2
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$cache/rootfs.tar" .
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$cache/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash "$ctr"
  buildah commit --rm "$ctr" "oci-archive:$base.tmp:simserve-base" >/dev/null
  mv "$base.tmp" "$base"
  rm -f "$cache/rootfs.tar"
fi

echo "== buildah bud --target $target -> $tag" >&2
# RUN steps share the host network; pip inside needs the host's CA bundle.
buildah bud --format docker --layers=false --target "$target" -t "$tag" \
  --build-arg "BASE_IMAGE=oci-archive:$base" \
  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  -f Dockerfile . >&2
if [ -n "$out" ]; then
  rm -f "$out"
  buildah push "$tag" "oci-archive:$out:$tag" >&2
fi
buildah rmi --prune >/dev/null 2>&1 || true  # the previous build of this tag
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag"
