#!/usr/bin/env bash
# (Re)builds docker.io/ktproxy/nginx-light:0.1.0 for the mesh benchmark's in-cluster yardstick (kt-connect's
# router is nginx plus a generated route.conf): the base image plus the files of Debian bookworm's `nginx`
# package (since bookworm nginx-light is a metapackage over it: same binary), the version this machine has
# installed (the loopback case's nginx). Not nginx-common: the benchmark gives nginx its whole
# configuration (-p, -c, -e). Cached; imports into the cluster's
# containerd when that runs. `flock /tmp/ktproxy-images.lock bash tests/cluster/images/nginx.sh`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
STATE="${KTPROXY_CLUSTER_DIR:-$REPO/.cluster}"
OUT="$CACHE/images"
DEBS="$CACHE/debs"
SOCK="$STATE/run/containerd.sock"
TAG=docker.io/ktproxy/nginx-light:0.1.0
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
log() { echo "[images $(date +%H:%M:%S)] $*"; }
die() { echo "images: $*" >&2; exit 1; }
mkdir -p "$OUT" "$DEBS" "$STATE/images"

bash "$HERE/rootfs.sh"
ROOT="$CACHE/rootfs/bookworm"

version=$(dpkg-query -W -f '${Version}' nginx 2>/dev/null || true)
deb=$(ls "$DEBS"/nginx_"${version//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
if [[ -z "$deb" ]]; then
  log "downloading nginx ${version:-(candidate)} from Debian"
  # _apt cannot write into root's cache: download where it can, then move.
  tmp=$(mktemp -d); chmod 0755 "$tmp"
  (cd "$tmp" && apt-get download -q "nginx${version:+=$version}" >/dev/null 2>&1) \
    || { rm -rf "$tmp"; die "apt-get download nginx failed (run apt-get update?)"; }
  mv "$tmp"/nginx_*.deb "$DEBS"/; rm -rf "$tmp"
  deb=$(ls -t "$DEBS"/nginx_*.deb | head -1)
fi

hash=$( (basename "$deb"; cat "$0") | sha256sum | cut -c1-16)
if [[ "$(cat "$OUT/nginx.hash" 2>/dev/null)" != "$hash" ]]; then
  log "building nginx layer from $(basename "$deb")"
  d=$(mktemp -d)
  dpkg-deb -x "$deb" "$d"
  rm -rf "$d/usr/share/doc" "$d/usr/share/man"
  # The libraries nginx links (libssl3, libpcre2-8-0, zlib1g, libcrypt1) are in the base layer already.
  missing=$(ldd "$d/usr/sbin/nginx" | awk '/=>/ {print $1}' | while read -r lib; do
              ls "$ROOT"/usr/lib/x86_64-linux-gnu/"$lib" "$ROOT"/lib/x86_64-linux-gnu/"$lib" >/dev/null 2>&1 \
                || echo "$lib"; done)
  [[ -z "$missing" ]] || die "the base image lacks libraries nginx needs: $missing"
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$d" -cf "$OUT/nginx-layer.tar.tmp" . \
    && mv "$OUT/nginx-layer.tar.tmp" "$OUT/nginx-layer.tar"
  rm -rf "$d"; echo "$hash" > "$OUT/nginx.hash"
fi

"$PY" "$HERE/mkimage.py" --tag "$TAG" --layer "$CACHE/rootfs/base-layer.tar" --layer "$OUT/nginx-layer.tar" \
  --env LANG=C.UTF-8 --entrypoint '["/usr/sbin/nginx"]' --out "$OUT/nginx.tar" >/dev/null

if [[ ! -S "$SOCK" ]] || ! ctr -a "$SOCK" version >/dev/null 2>&1; then
  log "archive ready in $OUT/nginx.tar; the cluster's containerd is not running"
  exit 0
fi
id=$(cat "$OUT/nginx.tar.config")
if ctr -a "$SOCK" -n k8s.io images ls -q | grep -qxF "$TAG" && [[ "$(cat "$STATE/images/nginx.id" 2>/dev/null)" == "$id" ]]; then
  log "$TAG present"
  exit 0
fi
log "importing $TAG"
ctr -a "$SOCK" -n k8s.io images import "$OUT/nginx.tar" >/dev/null || die "ctr import of $TAG failed"
echo "$id" > "$STATE/images/nginx.id"
log "$TAG imported"
