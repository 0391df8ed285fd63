#!/usr/bin/env bash
# Stops everything up.sh started (by pid file only), removes pod containers and their network
# namespaces, unmounts kubelet/containerd mounts, and removes the interfaces, routes, iptables rules and
# sysctl changes up.sh made. Keeps certificates, etcd data and imported images so the next cluster-up
# is quick; `down.sh --purge` removes .cluster entirely (logs too).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PURGE=0; [[ "${1:-}" == --purge ]] && PURGE=1
[[ $(id -u) == 0 ]] || die "cluster-down needs root"

stop() {
  local name=$1 pid i
  if ! pid=$(pid_of "$name"); then rm -f "$RUN/$name.pid"; return 0; fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not exit in 10s: SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
  rm -f "$RUN/$name.pid"
}

stop coredns
stop kube-proxy
stop kubelet

# Pods: kill their tasks and delete their containers through containerd, sandboxes last, and remember
# each sandbox's network namespace (the veth goes away with it).
netns=()
if pid_of containerd >/dev/null; then
  ctr_() { ctr -a "$SOCK" -n k8s.io "$@"; }
  mapfile -t tasks < <(ctr_ tasks ls -q 2>/dev/null)
  ((${#tasks[@]})) && log "killing ${#tasks[@]} pod containers"
  for t in "${tasks[@]}"; do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
  for t in "${tasks[@]}"; do
    for ((i = 0; i < 50; i++)); do
      [[ $(ctr_ tasks ls 2>/dev/null | awk -v id="$t" '$1==id{print $3}') == RUNNING ]] || break; sleep 0.1
    done
    ctr_ tasks delete -f "$t" >/dev/null 2>&1
  done
  mapfile -t containers < <(ctr_ containers ls -q 2>/dev/null)
  for c in "${containers[@]}"; do
    ns=$(ctr_ containers info "$c" 2>/dev/null | python3 -c '
import json, sys
spec = json.load(sys.stdin).get("Spec") or {}
for n in spec.get("linux", {}).get("namespaces", []):
    if n.get("type") == "network" and n.get("path"):
        print(n["path"])' 2>/dev/null)
    [[ -n $ns ]] && netns+=("$ns")
    ctr_ containers delete "$c" >/dev/null 2>&1
  done
fi
stop containerd
for ns in $(printf '%s\n' "${netns[@]}" | sort -u); do
  [[ $ns == /var/run/netns/* || $ns == /run/netns/* ]] || continue
  umount "$ns" 2>/dev/null; rm -f "$ns"
done

# Mounts under the state dir (secret/projected tmpfs volumes, container rootfs, shm), deepest first.
mapfile -t mounts < <(awk -v p="$STATE/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r)
((${#mounts[@]})) && log "unmounting ${#mounts[@]} mounts under $STATE"
for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done

stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd

log "removing iptables rules"
[[ -x "$BIN/kube-proxy" ]] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1
for cmd in iptables ip6tables; do
  command -v $cmd >/dev/null || continue
  for table in mangle nat filter; do
    # kubelet's canaries and hints, and portmap's chains, are the only other rules this cluster makes.
    chains=$($cmd -t $table -S 2>/dev/null | awk '$1=="-N" && ($2 ~ /^KUBE-/ || $2 ~ /^CNI-/) {print $2}')
    for ch in $chains; do
      $cmd -t $table -S 2>/dev/null | awk -v ch="$ch" '$1=="-A" && $0 ~ ("-j " ch "( |$)") {sub(/^-A/, "-D"); print}' |
        while read -r rule; do eval "$cmd -t $table $rule" 2>/dev/null; done
    done
    for ch in $chains; do $cmd -t $table -F "$ch" 2>/dev/null; done
    for ch in $chains; do $cmd -t $table -X "$ch" 2>/dev/null; done
  done
done
iptables -t mangle -D FORWARD -j "$GUARD_CHAIN" 2>/dev/null
iptables -t mangle -F "$GUARD_CHAIN" 2>/dev/null; iptables -t mangle -X "$GUARD_CHAIN" 2>/dev/null

log "removing interfaces and routes"
ip route del "$SERVICE_CIDR" dev "$BRIDGE_IF" 2>/dev/null
for net in "$POD_CIDR" "$SERVICE_GUARD" "$NODE_NET"; do ip route del unreachable "$net" 2>/dev/null; done
# Host ends of pod veths still on the bridge (normally gone with their namespaces).
for v in $(ip -o link show master "$BRIDGE_IF" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
  ip link del "$v" 2>/dev/null
done
ip link del "$BRIDGE_IF" 2>/dev/null
ip link del "$DUMMY_IF" 2>/dev/null
# IP allocations of the pods just removed.
rm -rf "$STATE/cni/networks"

if [[ -f "$RUN/sysctl.saved" ]]; then
  while IFS='=' read -r key val; do echo "$val" > "/proc/sys/${key//.//}" 2>/dev/null; done < "$RUN/sysctl.saved"
  rm -f "$RUN/sysctl.saved"
fi

# Empty pod cgroups the kubelet made (cgroupfs driver): rmdir only removes empty ones.
for h in /sys/fs/cgroup/*/; do
  [[ -d "$h/kubepods" ]] && find "$h/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done

if ((PURGE)); then log "purging $STATE"; rm -rf "$STATE"; fi
log "cluster down"
