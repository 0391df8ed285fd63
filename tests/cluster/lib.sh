# Shared settings and helpers for up.sh, down.sh and status.sh (sourced, not run).
# Addresses: everything the cluster uses lives in ranges that `unreachable` routes cover, so a
# mistake can never send a packet off this machine.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
BIN="$CACHE/bin/$K8S_VERSION"
STATE="${KTPROXY_CLUSTER_DIR:-$REPO/.cluster}"
RUN="$STATE/run"
LOGS="$STATE/logs"
PKI="$STATE/pki"
CONF="$STATE/conf"
KUBECONFIG_ADMIN="$STATE/kubeconfig"

NODE_NAME="ktproxy-node"
NODE_IP="172.31.255.1"            # on the dummy interface; apiserver, kubelet and CoreDNS bind here
NODE_NET="172.31.255.0/24"
POD_CIDR="10.244.0.0/16"
NODE_POD_CIDR="10.244.0.0/24"
POD_GW="10.244.0.1"
SERVICE_CIDR="10.96.0.0/16"
SERVICE_GUARD="10.96.0.0/12"
API_SERVICE_IP="10.96.0.1"
DNS_IP="10.96.0.10"
DNS_DOMAIN="cluster.local"
DUMMY_IF="ktp0"
BRIDGE_IF="cni0"
GUARD_CHAIN="KTPROXY-GUARD"
API_URL="https://$NODE_IP:6443"
SOCK="$RUN/containerd.sock"

# name -> binary, in start order; down.sh stops them in reverse order.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns)
bin_of() {
  case "$1" in
    containerd) echo /usr/bin/containerd ;;
    *) echo "$BIN/$1" ;;
  esac
}

log() { echo "[cluster $(date +%H:%M:%S)] $*"; }
DIED=0
die() { echo "[cluster] ERROR: $*" >&2; DIED=1; exit 1; }

# Alive only if the pid in the file runs the binary we started: a recycled pid is not ours.
pid_of() {
  local name=$1 pid exe
  pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [[ "${exe% (deleted)}" == "$(bin_of "$name")" ]] || return 1
  echo "$pid"
}

# exec_settled NAME SECONDS: up.sh records the pid of `setsid nohup env BIN ...`, which runs BIN only once
# setsid, nohup and env have exec'd in turn; on a busy machine that takes a moment, and until then
# pid_of says "not running". Waits until pid_of sees BIN: 0 once it does, 1 as soon as the pid is gone
# (or a zombie), 2 if it is still on its way after SECONDS.
exec_settled() {
  local name=$1 limit=$2 pid stat end=$((SECONDS + $2))
  pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 1
  until pid_of "$name" >/dev/null; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]] || return 1
    (( SECONDS < end )) || return 2
    sleep 0.1
  done
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }
