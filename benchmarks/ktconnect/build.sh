#!/usr/bin/env bash
# Builds kt-connect v0.3.7 (alibaba/kt-connect) as a benchmark yardstick, from its Go module source, plus
# its shadow image from Debian bookworm + openssh-server following kt-connect's published layout
# (build/docker/shadow/{Dockerfile_base,Dockerfile,run.sh,sshd_config,disconnect.sh}), and imports the
# image into the local cluster's containerd. Idempotent: every step is cached under
# ~/.cache/ktproxy-cluster/ktconnect/ and skipped when its inputs did not change.
#
#   bash benchmarks/ktconnect/build.sh            # binaries + image + import (import skipped if no cluster)
#   bash benchmarks/ktconnect/build.sh binaries   # only ktctl + shadow
#
# Nothing of kt-connect is written into this repository. Network: the Go module proxy (Go modules and the
# go1.19 toolchain module only) and this machine's configured Debian mirror (apt). Nothing else.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$HERE/../.." && pwd)"
KT_VERSION="${KT_VERSION:-v0.3.7}"
GO_OLD="go1.19.13"     # gvisor (via tun2socks) in kt-connect's graph has `//go:build !go1.20` files
CLUSTER_CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
CACHE="${KTCONNECT_CACHE:-$CLUSTER_CACHE/ktconnect}"
STATE="${KTPROXY_CLUSTER_DIR:-$REPO/.cluster}"
SOCK="$STATE/run/containerd.sock"
ROOT="$CLUSTER_CACHE/rootfs/bookworm"
BASE_LAYER="$CLUSTER_CACHE/rootfs/base-layer.tar"
IMAGE="${KTCONNECT_IMAGE:-localhost/ktconnect/kt-connect-shadow:$KT_VERSION}"
# Dockerfile_base's package list (Ubuntu 22.04 there, Debian bookworm here).
PKGS=(openssh-server dnsutils iputils-ping net-tools iproute2 curl lsof)
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3

log() { echo "[ktconnect $(date +%H:%M:%S)] $*"; }
die() {  # one clear line; also kept for benchmarks.ktconnect.available() to report
  echo "ktconnect build: $*" >&2
  mkdir -p "$CACHE" && echo "$*" > "$CACHE/build.failed" || true
  exit 1
}
hash_of() { sha256sum | cut -c1-16; }
mkdir -p "$CACHE"
cd "$CACHE"   # outside any module, so `go mod download` is not affected by a go.mod

# --- 1. kt-connect source (Go module) --------------------------------------------------------------
command -v go >/dev/null || die "cannot build kt-connect: no 'go' on PATH"
log "kt-connect $KT_VERSION module source"
SRC=$(GOFLAGS=-mod=mod go mod download -json "github.com/alibaba/kt-connect@$KT_VERSION" 2>&1 \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') || true
[[ -n "$SRC" && -d "$SRC" ]] || die "cannot build kt-connect: 'go mod download github.com/alibaba/kt-connect@$KT_VERSION' failed (module proxy unreachable or version not served)"

# --- 2. an old Go toolchain (the current one cannot compile kt-connect's dependency graph) -------------
GOROOT_OLD="$CACHE/$GO_OLD"
if [[ ! -x "$GOROOT_OLD/bin/go" ]]; then
  log "fetching the $GO_OLD toolchain module from the Go module proxy"
  zip=$(go mod download -json "golang.org/toolchain@v0.0.1-$GO_OLD.linux-amd64" 2>&1 \
        | sed -n 's/^[[:space:]]*"Zip": "\(.*\)",$/\1/p') || true
  [[ -n "$zip" && -f "$zip" ]] || die "cannot build kt-connect: Go toolchain $GO_OLD not available from the module proxy (needed: gvisor@2022-04 refuses go>=1.20)"
  tmp=$(mktemp -d "$CACHE/tc.XXXXXX")
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$zip" "$tmp"
  rm -rf "$GOROOT_OLD"
  mv "$tmp/golang.org/toolchain@v0.0.1-$GO_OLD.linux-amd64" "$GOROOT_OLD"; rm -rf "$tmp"
  chmod -R u+w "$GOROOT_OLD"; chmod +x "$GOROOT_OLD"/bin/* "$GOROOT_OLD"/pkg/tool/*/*
fi

# --- 3. ktctl + shadow from a wrapper module ------------------------------------------------------
# `go install github.com/alibaba/kt-connect/cmd/ktctl@v0.3.7` is refused: its go.mod has a replace
# directive (xjasonlyu/tun2socks -> linfan/tun2socks). A wrapper module repeats that replace.
W="$CACHE/wrapper"
replace_line=$(grep -E '^replace ' "$SRC/go.mod" || true)
bin_hash=$( (echo "$KT_VERSION $GO_OLD"; echo "$replace_line"; sed -n '/--- 3\./,/--- 4\./p' "$SELF") | hash_of)
if [[ "$(cat "$CACHE/bin.hash" 2>/dev/null)" != "$bin_hash" || ! -x "$CACHE/ktctl" || ! -x "$CACHE/shadow" ]]; then
  log "building ktctl and shadow $KT_VERSION with $GO_OLD (first build: ~5 min)"
  mkdir -p "$W"
  cat > "$W/go.mod" <<EOF
module ktconnect.local/build

go 1.18

require github.com/alibaba/kt-connect $KT_VERSION

$replace_line
EOF
  printf '//go:build tools\n\npackage build\n\nimport (\n\t_ "github.com/alibaba/kt-connect/cmd/ktctl"\n\t_ "github.com/alibaba/kt-connect/cmd/shadow"\n)\n' > "$W/tools.go"
  cp "$SRC/go.sum" "$W/go.sum"; chmod u+w "$W/go.sum"
  gox() { (cd "$W" && env -u GOFLAGS GOROOT="$GOROOT_OLD" GOTOOLCHAIN=local CGO_ENABLED=0 "$GOROOT_OLD/bin/go" "$@"); }
  gox mod tidy >"$CACHE/build.log" 2>&1 || { tail -5 "$CACHE/build.log" >&2; die "cannot build kt-connect: 'go mod tidy' of the wrapper module failed (see $CACHE/build.log)"; }
  gox build -buildvcs=false -trimpath -ldflags "-s -w -X main.version=${KT_VERSION#v}" -o "$CACHE/ktctl.tmp" \
      github.com/alibaba/kt-connect/cmd/ktctl >>"$CACHE/build.log" 2>&1 \
    || { tail -5 "$CACHE/build.log" >&2; die "cannot build kt-connect: go build of cmd/ktctl failed (see $CACHE/build.log)"; }
  gox build -buildvcs=false -trimpath -ldflags "-s -w" -o "$CACHE/shadow.tmp" \
      github.com/alibaba/kt-connect/cmd/shadow >>"$CACHE/build.log" 2>&1 \
    || { tail -5 "$CACHE/build.log" >&2; die "cannot build kt-connect: go build of cmd/shadow failed (see $CACHE/build.log)"; }
  mv "$CACHE/ktctl.tmp" "$CACHE/ktctl"; mv "$CACHE/shadow.tmp" "$CACHE/shadow"
  echo "$bin_hash" > "$CACHE/bin.hash"
fi
# ktctl writes ~/.kt on every start, even for --version: give it a throwaway HOME.
ver=$(HOME="$CACHE/home" "$CACHE/ktctl" --version 2>&1) || die "built ktctl does not run: $ver"
log "ktctl ready: $CACHE/ktctl ($ver)"
if [[ "${1:-}" == "binaries" ]]; then rm -f "$CACHE/build.failed"; exit 0; fi

# --- 4. sshd layer: Debian openssh-server & co on the cached bookworm rootfs ----------------------
[[ -s "$BASE_LAYER" && -d "$ROOT" ]] || bash "$REPO/tests/cluster/images/rootfs.sh" \
  || die "cannot build the kt-connect shadow image: the Debian rootfs (tests/cluster/images/rootfs.sh) failed"
[[ $(id -u) == 0 ]] || die "cannot build the kt-connect shadow image: needs root (overlay mount + chroot)"
DEBS="$CACHE/debs"
sshd_hash=$( (printf '%s\n' "${PKGS[@]}"; cat "$CLUSTER_CACHE/rootfs/.done"; sed -n '/--- 4\./,/--- 5\./p' "$SELF") | hash_of)
if [[ "$(cat "$CACHE/sshd-layer.hash" 2>/dev/null)" != "$sshd_hash" || ! -s "$CACHE/sshd-layer.tar" ]]; then
  log "downloading ${PKGS[*]} (+ deps missing from the rootfs) from the Debian mirror"
  rm -rf "$DEBS"; mkdir -p "$DEBS/partial"
  # The host's apt, resolving against the rootfs's dpkg status, so exactly what the rootfs lacks comes.
  aptx() { apt-get -q -y -o Dir::State::status="$ROOT/var/lib/dpkg/status" -o Dir::Cache::archives="$DEBS" \
             -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o Debug::NoLocking=1 \
             --no-install-recommends "$@"; }
  if ! aptx --download-only install "${PKGS[@]}" >"$CACHE/apt.log" 2>&1; then
    log "apt download failed; refreshing the host's package lists once (apt-get update)"
    apt-get -q update >>"$CACHE/apt.log" 2>&1 || true
    aptx --download-only install "${PKGS[@]}" >>"$CACHE/apt.log" 2>&1 \
      || { tail -5 "$CACHE/apt.log" >&2; die "cannot build the kt-connect shadow image: apt could not download ${PKGS[*]} (see $CACHE/apt.log)"; }
  fi
  log "installing $(ls "$DEBS"/*.deb | wc -l) packages into an overlay of the rootfs (offline dpkg)"
  work=$(mktemp -d); mkdir -p "$work/upper" "$work/work" "$work/merged"
  mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$work/upper,workdir=$work/work" "$work/merged"
  cleanup_overlay() { umount "$work/merged" 2>/dev/null || true; rm -rf "$work"; }
  trap cleanup_overlay EXIT
  m="$work/merged"
  mkdir -p "$m/tmp/debs"; cp "$DEBS"/*.deb "$m/tmp/debs/"
  printf '#!/bin/sh\nexit 101\n' > "$m/usr/sbin/policy-rc.d"; chmod 755 "$m/usr/sbin/policy-rc.d"
  cenv=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
        DEBIAN_FRONTEND=noninteractive)
  chroot "$m" "${cenv[@]}" sh -c 'dpkg -i /tmp/debs/*.deb' >"$CACHE/dpkg.log" 2>&1 \
    || { tail -8 "$CACHE/dpkg.log" >&2; die "cannot build the kt-connect shadow image: dpkg -i failed (see $CACHE/dpkg.log)"; }
  # Dockerfile_base: mkdir /var/run/sshd; pam_loginuid optional ("SSH login fix").
  mkdir -p "$m/run/sshd"
  sed 's@session\s*required\s*pam_loginuid.so@session optional pam_loginuid.so@g' -i "$m/etc/pam.d/sshd"
  # Host keys are generated at package install, i.e. baked into the image, as in the published one.
  chroot "$m" "${cenv[@]}" ssh-keygen -A >/dev/null
  rm -f "$m/usr/sbin/policy-rc.d"; rm -rf "$m/tmp/debs"
  umount "$m"
  up="$work/upper"
  rm -rf "$up/tmp" "$up/root/.cache" "$up/var/cache/apt" "$up/var/cache/debconf"/*-old \
         "$up/usr/share/doc" "$up/usr/share/man" "$up/var/log"
  # overlayfs whiteouts (char 0:0) -> docker whiteout files (.wh.NAME), so deletions survive as a layer.
  while IFS= read -r -d '' f; do
    rm -f "$f"; : > "$(dirname "$f")/.wh.$(basename "$f")"
  done < <(find "$up" -type c -print0)
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$up" -cf "$CACHE/sshd-layer.tar.tmp" .
  mv "$CACHE/sshd-layer.tar.tmp" "$CACHE/sshd-layer.tar"
  trap - EXIT; rm -rf "$work"
  echo "$sshd_hash" > "$CACHE/sshd-layer.hash"
fi

# --- 5. kt layer: kt-connect's own files, exactly as its Dockerfile copies them -------------------
D="$SRC/build/docker/shadow"
for f in run.sh disconnect.sh sshd_config; do [[ -f "$D/$f" ]] || die "cannot build the kt-connect shadow image: $D/$f missing in the module"; done
kt_hash=$( (cat "$D/run.sh" "$D/disconnect.sh" "$D/sshd_config" "$CACHE/shadow"; sed -n '/--- 5\./,/--- 6\./p' "$SELF") | hash_of)
if [[ "$(cat "$CACHE/kt-layer.hash" 2>/dev/null)" != "$kt_hash" || ! -s "$CACHE/kt-layer.tar" ]]; then
  log "building the kt layer (run.sh, disconnect.sh, sshd_config, /usr/sbin/shadow)"
  d=$(mktemp -d); mkdir -p "$d/usr/sbin" "$d/etc/ssh"
  install -m 0755 "$CACHE/shadow" "$d/usr/sbin/shadow"
  install -m 0755 "$D/run.sh" "$d/run.sh"
  install -m 0755 "$D/disconnect.sh" "$d/disconnect.sh"
  install -m 0644 "$D/sshd_config" "$d/etc/ssh/sshd_config"
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$d" -cf "$CACHE/kt-layer.tar" .
  rm -rf "$d"; echo "$kt_hash" > "$CACHE/kt-layer.hash"
fi

# --- 6. archive + import ----------------------------------------------------------------------------
"$PY" "$REPO/tests/cluster/images/mkimage.py" --tag "$IMAGE" \
  --layer "$BASE_LAYER" --layer "$CACHE/sshd-layer.tar" --layer "$CACHE/kt-layer.tar" \
  --env LANG=C.UTF-8 --expose 22/tcp --label org.ktproxy.yardstick=kt-connect-$KT_VERSION \
  --entrypoint '["/run.sh"]' --out "$CACHE/shadow-image.tar" || die "cannot assemble the kt-connect shadow image archive"
if [[ ! -S "$SOCK" ]] || ! ctr -a "$SOCK" version >/dev/null 2>&1; then
  rm -f "$CACHE/build.failed"
  log "image archive ready ($CACHE/shadow-image.tar); the cluster's containerd is not running, import skipped"
  exit 0
fi
id=$(cat "$CACHE/shadow-image.tar.config")
if ctr -a "$SOCK" -n k8s.io images ls -q | grep -qxF "$IMAGE" && [[ "$(cat "$CACHE/imported.id" 2>/dev/null)" == "$id" ]]; then
  log "image $IMAGE already imported"
else
  log "importing $IMAGE into the cluster's containerd"
  ctr -a "$SOCK" -n k8s.io images import "$CACHE/shadow-image.tar" >/dev/null || die "ctr import of $IMAGE failed"
  echo "$id" > "$CACHE/imported.id"
fi
rm -f "$CACHE/build.failed"
log "done: ktctl=$CACHE/ktctl image=$IMAGE"
