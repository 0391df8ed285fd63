#!/usr/bin/env bash
# Brings up a single-node Kubernetes built from upstream sources: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy (iptables) and CoreDNS, all
# as host processes with pid files and logs under .cluster/. Idempotent: running parts are left alone.
# Needs root (it creates interfaces, routes, iptables rules and mounts).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
T0=$SECONDS
# die() already printed its one line; anything else that stops the script gets one here.
trap 'rc=$?; [[ $rc == 0 || $DIED == 1 ]] || echo "[cluster] ERROR: cluster-up failed (exit $rc); logs in $LOGS" >&2' EXIT

[[ $(id -u) == 0 ]] || die "cluster-up needs root (interfaces, routes, iptables, mounts)"
[[ $(uname -s) == Linux ]] || die "the local cluster runs on Linux only"
mkdir -p "$RUN" "$LOGS" "$CONF" "$STATE/images" "$CACHE"
for d in "$STATE" "$CACHE"; do
  free_mb=$(( $(df -Pk "$d" | awk 'NR==2{print $4}') / 1024 ))
  (( free_mb >= 2048 )) || die "only $free_mb MB free under $d; the cluster needs at least 2 GB (8 GB for a cold build)"
done

# --- prerequisites --------------------------------------------------------------------------------
log "checking Debian packages"
bash "$HERE/install-deps.sh" || die "installing Debian packages failed"
all_cached=1
for c in "${COMPONENTS[@]}" kubectl; do [[ $c == containerd || -x "$BIN/$c" ]] || all_cached=0; done
# The machine image installs Go under /usr/local/go; a non-login shell (CI) may not have it on PATH.
[[ -x /usr/local/go/bin/go ]] && ! command -v go >/dev/null && export PATH="/usr/local/go/bin:$PATH"
if (( ! all_cached )) && ! command -v go >/dev/null; then
  die "no Go toolchain on PATH: building Kubernetes $K8S_VERSION from source needs Go >= 1.24 (Debian's golang-go is too old)"
fi
log "checking Kubernetes binaries (cached in $BIN; a cold build takes 10-30 minutes)"
bash "$HERE/build-k8s.sh" 2>&1 | sed -u 's/^/  /' || true
for c in "${COMPONENTS[@]}" kubectl; do
  [[ $c == kubectl ]] && b="$BIN/kubectl" || b=$(bin_of "$c")
  [[ -x $b ]] || die "missing $b after build-k8s.sh (see its output above)"
done
mkdir -p "$STATE/bin"
for b in kubectl kube-proxy; do ln -sfn "$BIN/$b" "$STATE/bin/$b"; done

# --- host network -----------------------------------------------------------------------------------
# Save the sysctls we change once, so cluster-down can put them back.
sysctl_set() {
  local key=$1 val=$2 f="/proc/sys/${1//.//}"
  [[ -e $f ]] || die "$key missing (br_netfilter not loaded?)"
  grep -q "^$key=" "$RUN/sysctl.saved" 2>/dev/null || echo "$key=$(cat "$f")" >> "$RUN/sysctl.saved"
  echo "$val" > "$f"
}
log "setting up $DUMMY_IF ($NODE_IP, $DNS_IP), $BRIDGE_IF ($POD_GW/24) and unreachable guard routes"
# A portless bridge stands in where the kernel has no dummy driver (this VM's kernel lacks CONFIG_DUMMY):
# either way the addresses are local and nothing can leave through it.
ip link show "$DUMMY_IF" >/dev/null 2>&1 || ip link add "$DUMMY_IF" type dummy 2>/dev/null \
  || ip link add "$DUMMY_IF" type bridge || die "cannot create interface $DUMMY_IF"
ip addr replace "$NODE_IP/32" dev "$DUMMY_IF"
ip addr replace "$DNS_IP/32" dev "$DUMMY_IF"
ip link set "$DUMMY_IF" up
ip link show "$BRIDGE_IF" >/dev/null 2>&1 || ip link add "$BRIDGE_IF" type bridge
ip addr replace "$POD_GW/24" dev "$BRIDGE_IF"
ip link set "$BRIDGE_IF" up
# Nothing in the cluster's ranges may ever be routed off this machine.
for net in "$POD_CIDR" "$SERVICE_GUARD" "$NODE_NET"; do ip route replace unreachable "$net"; done
# Host-originated ClusterIP traffic must find a route before kube-proxy's OUTPUT DNAT rewrites it.
ip route replace "$SERVICE_CIDR" dev "$BRIDGE_IF" src "$POD_GW"
sysctl_set net.bridge.bridge-nf-call-iptables 1
prev_fwd=$(awk -F= '$1=="net.ipv4.ip_forward"{print $2}' "$RUN/sysctl.saved" 2>/dev/null || true)
prev_fwd=${prev_fwd:-$(cat /proc/sys/net/ipv4/ip_forward)}
sysctl_set net.ipv4.ip_forward 1
# Forwarding is on for pod<->service traffic only: the bridge forwards to itself and nowhere else.
# If the host did not forward before, it also must not start routing for its uplinks because of us.
# (Other bridges/veths on the host, e.g. test network namespaces, are left alone.)
iptables -t mangle -N "$GUARD_CHAIN" 2>/dev/null || iptables -t mangle -F "$GUARD_CHAIN"
iptables -t mangle -A "$GUARD_CHAIN" -i "$BRIDGE_IF" -o "$BRIDGE_IF" -j RETURN
iptables -t mangle -A "$GUARD_CHAIN" -i "$BRIDGE_IF" -j DROP
iptables -t mangle -A "$GUARD_CHAIN" -o "$BRIDGE_IF" -j DROP
if [[ "$prev_fwd" == 0 ]]; then
  for up in $(ip -o route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' | sort -u); do
    iptables -t mangle -A "$GUARD_CHAIN" -i "$up" -j DROP
    iptables -t mangle -A "$GUARD_CHAIN" -o "$up" -j DROP
  done
fi
iptables -t mangle -C FORWARD -j "$GUARD_CHAIN" 2>/dev/null || iptables -t mangle -I FORWARD 1 -j "$GUARD_CHAIN"
# The kubelet needs shared mount propagation for its volume mounts, and /dev/kmsg for its OOM watcher.
mount --make-rshared /
[[ -e /dev/kmsg ]] || ln -s /dev/console /dev/kmsg

# --- certificates and configuration ---------------------------------------------------------------
log "certificates and kubeconfigs"
bash "$HERE/certs.sh"

# Config files are rewritten only when their content changes: kube-proxy exits whenever its file is
# written, and a component whose config did change must be restarted to pick it up.
declare -A RESTART=()
conf() {
  local comp=$1 file=$2 tmp
  tmp=$(mktemp "$file.XXXXXX")
  cat > "$tmp"
  if cmp -s "$tmp" "$file"; then rm -f "$tmp"; else mv "$tmp" "$file"; [[ -n $comp ]] && RESTART[$comp]=1; fi
  return 0
}

mkdir -p "$STATE/cni/net.d" "$STATE/cni/networks" "$STATE/containerd" "$STATE/kubelet" "$STATE/etcd"
# Pods get routes to the cluster's own ranges only, no default route: they cannot reach the internet.
conf "" "$STATE/cni/net.d/10-ktproxy.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "ktproxy",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE_IF",
      "isGateway": true,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/networks",
        "ranges": [[{"subnet": "$NODE_POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "$POD_CIDR"}, {"dst": "$SERVICE_CIDR"}, {"dst": "$NODE_NET"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON

conf containerd "$CONF/containerd.toml" <<TOML
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  disable_apparmor = true
  # This machine withholds CAP_SYS_RESOURCE even from root, so runc cannot lower oom_score_adj to the
  # kubelet's -998 for sandboxes ("can't get final child's PID from pipe"); clamp to our own instead.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$STATE/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/containerd/certs.d"
TOML

echo "nameserver $DNS_IP" | conf kubelet "$CONF/resolv.conf"
conf kubelet "$CONF/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://$SOCK
imageServiceEndpoint: unix://$SOCK
clusterDNS: [$DNS_IP]
clusterDomain: $DNS_DOMAIN
resolvConf: $CONF/resolv.conf
# Images are hand-imported (no registry): never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
podLogsDir: $STATE/kubelet-logs
serializeImagePulls: false
hairpinMode: hairpin-veth
maxPods: 110
shutdownGracePeriod: 0s
YAML

conf kube-proxy "$CONF/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $CONF/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts only on the node's own dummy address, never on eth0.
nodePortAddresses: ["$NODE_IP/32"]
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML

# Only cluster.local and the cluster's reverse zones: any other name gets REFUSED, never forwarded.
conf coredns "$CONF/Corefile" <<COREFILE
$DNS_DOMAIN:53 244.10.in-addr.arpa:53 96.10.in-addr.arpa:53 {
    bind $DNS_IP $NODE_IP
    errors
    kubernetes $DNS_DOMAIN 244.10.in-addr.arpa 96.10.in-addr.arpa {
        kubeconfig $KUBECONFIG_ADMIN
        pods insecure
        ttl 5
    }
    cache 5
}
COREFILE

# --- processes ------------------------------------------------------------------------------------
# containerd would resolve and dial a registry for any image that is not imported (a typo, a test of
# pull errors) via the host's resolver and default route. A dead loopback proxy makes every pull fail
# at once, locally, without even a DNS query (Go's proxy client hands the name to the proxy).
NO_NETWORK_ENV=(HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9
                https_proxy=http://127.0.0.1:9 NO_PROXY= no_proxy=)
start() {
  local name=$1; shift
  local envs=()
  [[ $name == containerd ]] && envs=("${NO_NETWORK_ENV[@]}")
  local args_id; args_id=$(printf '%s\n' "$(bin_of "$name")" "${envs[@]}" "$@" | sha256sum | cut -c1-16)
  [[ "$(cat "$RUN/$name.args" 2>/dev/null)" == "$args_id" ]] || RESTART[$name]=1
  if pid=$(pid_of "$name"); then
    if [[ -z ${RESTART[$name]:-} ]]; then log "$name already running (pid $pid)"; return 0; fi
    log "restarting $name (its flags or configuration changed)"
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; sleep 0.2; }
  fi
  log "starting $name..."
  echo "=== $(date -Is) starting $name" >> "$LOGS/$name.log"
  setsid nohup env "${envs[@]}" "$(bin_of "$name")" "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  echo "$args_id" > "$RUN/$name.args"
  date +%s > "$RUN/$name.started"
  # pid_of (and so wait_for, status.sh) knows the pid only once the exec chain reached the binary. A
  # start that died is left to wait_for, which prints the log.
  local rc=0
  exec_settled "$name" 30 || rc=$?
  [[ $rc != 2 ]] || die "$name (pid $!) still had not exec'd $(bin_of "$name") after 30s"
}

# wait_for WHAT SECONDS COMPONENT CMD...: polls CMD, prints progress, fails with the component's log tail.
wait_for() {
  local what=$1 limit=$2 comp=$3; shift 3
  local start=$SECONDS next=$((SECONDS + 10))
  log "waiting for $what..."
  until "$@" >/dev/null 2>&1; do
    if [[ -n $comp ]] && ! pid_of "$comp" >/dev/null; then
      tail -n 15 "$LOGS/$comp.log" >&2
      die "$comp exited while waiting for $what (log: $LOGS/$comp.log)"
    fi
    if (( SECONDS - start > limit )); then
      [[ -n $comp ]] && tail -n 15 "$LOGS/$comp.log" >&2
      die "timed out after ${limit}s waiting for $what${comp:+ (log: $LOGS/$comp.log)}"
    fi
    if (( SECONDS >= next )); then log "  still waiting for $what ($((SECONDS - start))s)"; next=$((SECONDS + 10)); fi
    sleep 1
  done
  log "$what: ok ($((SECONDS - start))s)"
}

api_get() { curl -fsS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$API_URL$1"; }

start etcd --name ktproxy --data-dir "$STATE/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster ktproxy=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
  --quota-backend-bytes 4294967296 --log-level warn
wait_for "etcd health" 60 etcd curl -fsS --max-time 3 http://127.0.0.1:2379/health

start kube-apiserver --etcd-servers http://127.0.0.1:2379 \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
  --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
  --service-account-issuer "https://kubernetes.default.svc.$DNS_DOMAIN" \
  --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
  --requestheader-client-ca-file "$PKI/ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --profiling=false --v=1
wait_for "kube-apiserver /readyz" 180 kube-apiserver api_get /readyz

start kube-controller-manager --kubeconfig "$CONF/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$CONF/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$CONF/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --allocate-node-cidrs=true --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
  --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false --v=1
start kube-scheduler --kubeconfig "$CONF/scheduler.kubeconfig" \
  --authentication-kubeconfig "$CONF/scheduler.kubeconfig" \
  --authorization-kubeconfig "$CONF/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1

start containerd --config "$CONF/containerd.toml"
wait_for "containerd" 60 containerd ctr -a "$SOCK" version

log "building/importing images (first run: debootstrap, a few minutes)"
if ! bash "$HERE/images/build.sh" 2>&1 | sed -u 's/^/  /'; then die "image build/import failed (see above)"; fi

start kubelet --config "$CONF/kubelet.yaml" --kubeconfig "$CONF/kubelet.kubeconfig" \
  --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet/pki" \
  --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --v=1
wait_for "node $NODE_NAME to register" 90 kubelet kc get node "$NODE_NAME"

start kube-proxy --config "$CONF/kube-proxy.yaml" --v=1
start coredns -conf "$CONF/Corefile"

log "creating kube-dns Service/Endpoints for $DNS_IP"
kc apply -f - >/dev/null 2>"$LOGS/kube-dns-apply.log" <<YAML || { cat "$LOGS/kube-dns-apply.log" >&2; die "creating kube-dns failed"; }
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS, kubernetes.io/cluster-service: "true"}
spec:
  clusterIP: $DNS_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
# CoreDNS runs on the host, not in a pod: the endpoint is the node address it binds.
apiVersion: v1
kind: Endpoints
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
subsets:
- addresses: [{ip: $NODE_IP}]
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
YAML

# The Node object keeps Ready=True from before a cluster-down: only a heartbeat from this kubelet counts.
node_ready() {
  local st hb
  read -r st hb < <(kc get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}')
  [[ $st == True ]] && (( $(date -d "$hb" +%s) >= $(cat "$RUN/kubelet.started" 2>/dev/null || echo 0) ))
}
wait_for "node $NODE_NAME Ready" 120 kubelet node_ready
dns_ok() { [[ -n $(dig +short +time=2 +tries=1 "@$DNS_IP" "kubernetes.default.svc.$DNS_DOMAIN") ]]; }
wait_for "CoreDNS answering on $DNS_IP" 60 coredns dns_ok
sa_ok() { kc -n default get serviceaccount default; }
wait_for "default ServiceAccount" 60 kube-controller-manager sa_ok
svc_ok() { curl -sk --max-time 3 "https://$API_SERVICE_IP/readyz" -o /dev/null; }
wait_for "kube-proxy rules (ClusterIP $API_SERVICE_IP reachable from the host)" 60 kube-proxy svc_ok

log "cluster up in $((SECONDS - T0))s. To use it:"
echo "  export KUBECONFIG=$KUBECONFIG_ADMIN PATH=$STATE/bin:\$PATH"
