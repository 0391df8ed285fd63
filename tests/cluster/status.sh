#!/usr/bin/env bash
# Says which cluster processes are running (by pid file) and, if the API answers, the node state.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
running=0
for c in "${COMPONENTS[@]}"; do
  if pid=$(pid_of "$c"); then printf '  %-24s running (pid %s)\n' "$c" "$pid"; running=$((running + 1))
  elif [[ -f "$RUN/$c.pid" ]]; then printf '  %-24s DEAD (stale pid file; log %s)\n' "$c" "$LOGS/$c.log"
  else printf '  %-24s stopped\n' "$c"; fi
done
echo "[cluster] $running/${#COMPONENTS[@]} components running; state in $STATE"
if [[ -s $KUBECONFIG_ADMIN && -x $BIN/kubectl ]] && kc get --raw /readyz >/dev/null 2>&1; then
  echo "[cluster] API $API_URL ready; KUBECONFIG=$KUBECONFIG_ADMIN"
  kc get nodes -o wide 2>/dev/null | sed 's/^/  /'
  [[ -n $(dig +short +time=1 +tries=1 "@$DNS_IP" "kubernetes.default.svc.$DNS_DOMAIN" 2>/dev/null) ]] \
    && echo "[cluster] CoreDNS answers on $DNS_IP" || echo "[cluster] CoreDNS does NOT answer on $DNS_IP"
  exit 0
fi
echo "[cluster] API not reachable"
[[ $running == "${#COMPONENTS[@]}" ]] || exit 1
