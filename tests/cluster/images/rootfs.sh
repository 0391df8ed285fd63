#!/usr/bin/env bash
# Builds (once) the Debian bookworm minbase rootfs with python3 that every cluster image starts from,
# and packs it as a layer tarball. Cached under ~/.cache/ktproxy-cluster/rootfs/.
# The mirror is read from this machine's apt sources: it is the only Debian host we may talk to.
set -euo pipefail
CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
OUT="$CACHE/rootfs"
ROOT="$OUT/bookworm"
LAYER="$OUT/base-layer.tar"
INCLUDE="python3,python3-venv,procps,iproute2"
log() { echo "[images $(date +%H:%M:%S)] $*"; }

if [[ -s "$LAYER" && -f "$OUT/.done" && "$(cat "$OUT/.done")" == "$INCLUDE" ]]; then
  log "base rootfs cached ($LAYER)"; exit 0
fi

mirror=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
  # deb822: take the URIs of the stanza whose Suites name plain bookworm (not bookworm-security).
  mirror=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |\n|$)/ && !/security/ {
             if (match($0, /URIs: *[^ \n]+/)) { s=substr($0,RSTART,RLENGTH); sub(/URIs: */,"",s); print s; exit } }' \
           /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
[[ -n "$mirror" ]] || { echo "rootfs: no bookworm mirror found in /etc/apt/sources.list(.d)" >&2; exit 1; }

rm -rf "$ROOT" "$OUT/.done"
mkdir -p "$OUT"
log "debootstrap bookworm minbase from $mirror (+ $INCLUDE); a few minutes on first run"
debootstrap --variant=minbase --include="$INCLUDE" bookworm "$ROOT" "$mirror" >"$OUT/debootstrap.log" 2>&1 || {
  echo "rootfs: debootstrap failed; see $OUT/debootstrap.log" >&2; tail -5 "$OUT/debootstrap.log" >&2; exit 1; }
# Shrink what every image carries: apt caches and docs are useless inside a test image.
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* "$ROOT"/var/log/*.log
# Pods get /dev, /proc and /sys from runc; the device nodes debootstrap made are not needed.
log "packing base layer"
tar --numeric-owner --xattrs -C "$ROOT" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
    -cf "$LAYER.tmp" .
mv "$LAYER.tmp" "$LAYER"
echo "$INCLUDE" > "$OUT/.done"
log "base rootfs ready: $(du -sh "$LAYER" | cut -f1)"
