#!/usr/bin/env bash
# Says which cluster processes are running (by pid file) and, if the API answers, the node state.
# Exit status 0 only when every component runs, the API is ready and CoreDNS answers: callers use it
# to decide whether cluster-up is needed (up.sh is idempotent and restarts only what is missing).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
running=0
for c in "${COMPONENTS[@]}"; do
  if pid=$(pid_of "$c"); then printf '  %-24s running (pid %s)\n' "$c" "$pid"; running=$((running + 1))
  elif [[ -f "$RUN/$c.pid" ]]; then printf '  %-24s DEAD (stale pid file; log %s)\n' "$c" "$LOGS/$c.log"
  else printf '  %-24s stopped\n' "$c"; fi
done
echo "[cluster] $running/${#COMPONENTS[@]} components running; state in $STATE"
healthy=1
(( running == ${#COMPONENTS[@]} )) || healthy=0
if [[ -s $KUBECONFIG_ADMIN && -x $BIN/kubectl ]] && kc get --raw /readyz --request-timeout=5s >/dev/null 2>&1; then
  echo "[cluster] API $API_URL ready; KUBECONFIG=$KUBECONFIG_ADMIN; kubectl: $STATE/bin/kubectl"
  kc get nodes -o wide 2>/dev/null | sed 's/^/  /'
  if [[ -n $(dig +short +time=1 +tries=1 "@$DNS_IP" "kubernetes.default.svc.$DNS_DOMAIN" 2>/dev/null) ]]; then
    echo "[cluster] CoreDNS answers on $DNS_IP"
  else
    echo "[cluster] CoreDNS does NOT answer on $DNS_IP"; healthy=0
  fi
else
  echo "[cluster] API not reachable"; healthy=0
fi
(( healthy )) || exit 1
