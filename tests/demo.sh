#!/usr/bin/env bash
# `make demo`: the first half of kt-connect's quickstart (seeds/000), command by command, with ktproxy.
# Without KUBECONFIG it brings up the local cluster (and takes it down again if it started it);
# with KUBECONFIG set it uses that cluster and only touches the demo objects it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KTCTL="$ROOT/.venv/bin/ktctl"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
started_cluster=0
if [[ -z "${KUBECONFIG:-}" ]]; then
  bash tests/cluster/install-deps.sh
  if ! bash tests/cluster/status.sh >/dev/null 2>&1; then
    echo "[demo] no KUBECONFIG: bringing up the local cluster (tests/cluster)"
    bash tests/cluster/up.sh
    started_cluster=1
  fi
  export KUBECONFIG="$ROOT/.cluster/kubeconfig"
  export PATH="$ROOT/.cluster/bin:$PATH"
fi
command -v kubectl >/dev/null || { echo "demo: kubectl not found on PATH" >&2; exit 1; }

work=$(mktemp -d)
connect_pid=""
cleanup() {
  set +e
  if [[ -n "$connect_pid" ]] && kill -0 "$connect_pid" 2>/dev/null; then
    kill -INT "$connect_pid"; wait "$connect_pid"
  fi
  echo; echo "[demo] removing the demo deployment and service"
  kubectl delete service tomcat --ignore-not-found >/dev/null
  kubectl delete deployment tomcat --ignore-not-found >/dev/null
  rm -rf "$work"
  if [[ $started_cluster == 1 && "${KTPROXY_KEEP_CLUSTER:-0}" != 1 ]]; then bash tests/cluster/down.sh; fi
}
trap cleanup EXIT

step "kubectl create deployment tomcat --image=tomcat:9 --port=8080"
kubectl create deployment tomcat --image=tomcat:9 --port=8080
step "kubectl expose deployment tomcat --port=8080 --target-port=8080"
kubectl expose deployment tomcat --port=8080 --target-port=8080
kubectl rollout status deployment/tomcat --timeout=120s
step "kubectl exec deployment/tomcat -c tomcat -- /bin/bash -c 'mkdir webapps/ROOT; echo \"kt-connect demo v1\" > webapps/ROOT/index.html'"
kubectl exec deployment/tomcat -c tomcat -- /bin/bash -c 'mkdir webapps/ROOT; echo "kt-connect demo v1" > webapps/ROOT/index.html'
step "kubectl get pod -o wide --selector app=tomcat"
kubectl get pod -o wide --selector app=tomcat
step "kubectl get svc tomcat"
kubectl get svc tomcat
pod_ip=$(kubectl get pod --selector app=tomcat -o jsonpath='{.items[0].status.podIP}')
cluster_ip=$(kubectl get svc tomcat -o jsonpath='{.spec.clusterIP}')

step "ktctl connect        # no sudo"
"$KTCTL" connect > "$work/connect.out" 2> >(tee "$work/connect.log" >&2) &
connect_pid=$!
for _ in $(seq 1 180); do
  grep -q "All looks good" "$work/connect.log" 2>/dev/null && break
  kill -0 "$connect_pid" 2>/dev/null || { echo "demo: ktctl connect exited" >&2; exit 1; }
  sleep 1
done
grep -q "All looks good" "$work/connect.log" || { echo "demo: ktctl connect did not become ready" >&2; exit 1; }
cat "$work/connect.out"
# shellcheck disable=SC1090
source <(grep '^export ' "$work/connect.out")

for url in "http://$pod_ip:8080" "http://$cluster_ip:8080" http://tomcat:8080 http://tomcat.default:8080 \
           http://tomcat.default.svc.cluster.local:8080; do
  step "curl $url"
  curl -sS --max-time 20 "$url"
done
step "dig @127.0.0.1 -p 10053 +short tomcat.default.svc.cluster.local"
dig @127.0.0.1 -p 10053 +short tomcat.default.svc.cluster.local || true
echo; echo "[demo] done: every request above went through ktctl connect (no TUN device, no routes, no sudo needed)."
