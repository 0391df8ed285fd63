#!/usr/bin/env bash
# Builds Kubernetes, etcd and CoreDNS from the Go module proxy into a cache outside the repo.
# Why a wrapper module: k8s.io/kubernetes replaces its staging modules with ./staging paths that
# are not in the module zip, so we require it and point each staging module at its published twin.
set -euo pipefail
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
BIN="$CACHE/bin/$K8S_VERSION"
WRAP="$CACHE/wrapper-$K8S_VERSION"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
TARGETS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

log() { echo "[build-k8s $(date +%H:%M:%S)] $*"; }

need_gb=8
avail_kb=$(df -Pk "$(dirname "$CACHE")" 2>/dev/null | awk 'NR==2{print $4}' || echo 0)
mkdir -p "$CACHE" "$BIN"
avail_kb=$(df -Pk "$CACHE" | awk 'NR==2{print $4}')
all_built=1
for t in "${TARGETS[@]}" etcd coredns; do [[ -x "$BIN/$t" ]] || all_built=0; done
if [[ $all_built == 1 ]]; then log "all binaries cached in $BIN"; exit 0; fi
if (( avail_kb < need_gb * 1024 * 1024 )); then
  echo "build-k8s: only $((avail_kb/1024)) MB free under $CACHE; the Kubernetes build needs about ${need_gb} GB" >&2
  exit 1
fi

mkdir -p "$WRAP"
cd "$WRAP"
log "resolving k8s.io/kubernetes@$K8S_VERSION"
gomod_json=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION")
upstream_mod=$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' <<<"$gomod_json")
go_line=$(grep -m1 '^go ' "$upstream_mod")
godebug_line=$(grep -m1 '^godebug' "$upstream_mod" || true)
staging=$(awk '/^replace \(/{r=1;next} r&&/^\)/{r=0} r&&/=> \.\/staging/{print $1}' "$upstream_mod")
etcd_version=$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2}' "$upstream_mod")
{
  echo "module ktproxy.local/k8sbuild"
  echo
  echo "$go_line"
  [[ -n "$godebug_line" ]] && echo "$godebug_line"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo "require go.etcd.io/etcd/server/v3 $etcd_version"
  echo
  echo "replace ("
  for m in $staging; do echo "	$m => $m $STAGING_VERSION"; done
  echo ")"
} > go.mod
mkdir -p etcd
cat > etcd/main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
log "downloading modules (first run: ~1-1.5 GB)"
GOFLAGS=-mod=mod go get "k8s.io/kubernetes@$K8S_VERSION" >/dev/null 2>&1 || true
for t in "${TARGETS[@]}"; do GOFLAGS=-mod=mod go get "k8s.io/kubernetes/cmd/$t@$K8S_VERSION"; done
# No `go mod tidy`: nothing in this module imports k8s.io/kubernetes, so tidy would drop it and the
# builds below would then resolve @latest.
GOFLAGS=-mod=mod go get ./etcd

major=$(cut -d. -f1 <<<"${K8S_VERSION#v}"); minor=$(cut -d. -f2 <<<"$K8S_VERSION")
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
export CGO_ENABLED=0
# A link of kube-apiserver can be silent for over ten minutes; say we are alive so neither a person nor a
# CI no-output watchdog takes it for a hang. (sleep must not hold our stdout: up.sh reads it via a pipe.)
heartbeat() { local what=$1 t0=$SECONDS; while sleep 60 >/dev/null 2>&1; do log "  still building $what ($((SECONDS - t0)) s)"; done; }
quiet_build() {
  local what=$1; shift
  heartbeat "$what" & local hb=$!
  local rc=0; "$@" || rc=$?
  kill "$hb" 2>/dev/null; wait "$hb" 2>/dev/null || true
  return $rc
}
for t in "${TARGETS[@]}"; do
  [[ -x "$BIN/$t" ]] && { log "$t cached"; continue; }
  log "building $t (this is the slow part; several minutes each on 2 cores)"
  start=$SECONDS
  GOFLAGS=-mod=mod quiet_build "$t" go build -trimpath -ldflags "$ldflags" -o "$BIN/$t.tmp" "k8s.io/kubernetes/cmd/$t"
  mv "$BIN/$t.tmp" "$BIN/$t"
  log "$t built in $((SECONDS-start)) s"
done
if [[ ! -x "$BIN/etcd" ]]; then
  log "building etcd $etcd_version"
  GOFLAGS=-mod=mod quiet_build etcd go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" ./etcd
  mv "$BIN/etcd.tmp" "$BIN/etcd"
fi
if [[ ! -x "$BIN/coredns" ]]; then
  log "building coredns $COREDNS_VERSION"
  GOBIN="$CACHE/gobin" quiet_build coredns go install "github.com/coredns/coredns@$COREDNS_VERSION"
  mv "$CACHE/gobin/coredns" "$BIN/coredns"
fi
log "done: $(ls "$BIN" | tr '\n' ' ')"
