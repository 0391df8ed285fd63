#!/usr/bin/env bash
# `make demo`: kt-connect's quickstart (seeds/000), command by command, with ktproxy: connect, then
# exchange, mesh, preview and forward.
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
command -v kubectl >/dev/null || { echo "[demo] stopping: kubectl not found on PATH" >&2; exit 1; }

work=$(mktemp -d)
connect_pid=""
bg_pids=()   # exchange/mesh/preview/forward/local server, stopped (SIGINT, like Ctrl-C) at exit
# The demo deletes only what it created: objects it makes carry this label, so a leftover of an earlier,
# interrupted demo is recognised as its own too. Anything else named tomcat is never touched.
DEMO_LABEL=ktproxy-demo
DEMO_IMAGE=tomcat:9
mine=()   # kind/name of the objects this demo owns, deleted at exit
stop() { echo "[demo] stopping: $*" >&2; exit 1; }
trap 'echo "[demo] stopping: \`$BASH_COMMAND\` failed (exit $?)" >&2' ERR
cleanup() {
  set +e
  trap - ERR
  for pid in "${bg_pids[@]}" $connect_pid; do
    if kill -0 "$pid" 2>/dev/null; then kill -INT "$pid"; wait "$pid"; fi
  done
  if (( ${#mine[@]} )); then
    echo; echo "[demo] removing what the demo created: ${mine[*]}"
    kubectl delete "${mine[@]}" --ignore-not-found >/dev/null
  fi
  rm -rf "$work"
  if [[ $started_cluster == 1 && "${KTPROXY_KEEP_CLUSTER:-0}" != 1 ]]; then bash tests/cluster/down.sh; fi
}
trap cleanup EXIT

# What already exists under the demo's names decides: create it, reuse it, or stop without touching it.
# Prints "absent", "mine" (labelled by an earlier demo) or "foreign".
owner() {
  local out
  out=$(kubectl get "$1" tomcat --ignore-not-found -o "jsonpath={.metadata.name} {.metadata.labels.$DEMO_LABEL}") \
    || return 1
  case "$out" in
    "") echo absent ;;
    "tomcat 1") echo mine ;;
    *) echo foreign ;;
  esac
}
deploy_owner=$(owner deployment) || stop "cannot read deployment tomcat (kubectl's error is above)"
svc_owner=$(owner service) || stop "cannot read service tomcat (kubectl's error is above)"
if [[ $deploy_owner == foreign ]]; then
  image=$(kubectl get deployment tomcat -o 'jsonpath={.spec.template.spec.containers[*].image}')
  [[ $image == "$DEMO_IMAGE" ]] || stop "this namespace already has a deployment 'tomcat' (image $image) that the demo" \
    "did not create; it is left untouched. Remove it or run the demo in another namespace (kubectl config set-context --current --namespace=...)."
  echo "[demo] reusing the existing deployment tomcat ($DEMO_IMAGE); the demo did not create it and will not delete it"
fi
if [[ $svc_owner == foreign ]]; then
  selector=$(kubectl get service tomcat -o 'jsonpath={.spec.selector.app} {.spec.ports[0].port}')
  [[ $selector == "tomcat 8080" ]] || stop "this namespace already has a service 'tomcat' (selector app=${selector% *}," \
    "port ${selector#* }) that the demo did not create; it is left untouched. Remove it or use another namespace."
  echo "[demo] reusing the existing service tomcat; the demo did not create it and will not delete it"
fi

if [[ $deploy_owner == absent ]]; then
  step "kubectl create deployment tomcat --image=$DEMO_IMAGE --port=8080"
  kubectl create deployment tomcat --image=$DEMO_IMAGE --port=8080
  mine+=(deployment/tomcat)
  kubectl label deployment tomcat "$DEMO_LABEL=1" >/dev/null
elif [[ $deploy_owner == mine ]]; then
  mine+=(deployment/tomcat)
fi
if [[ $svc_owner == absent ]]; then
  step "kubectl expose deployment tomcat --port=8080 --target-port=8080"
  kubectl expose deployment tomcat --port=8080 --target-port=8080
  mine+=(service/tomcat)
  kubectl label service tomcat "$DEMO_LABEL=1" >/dev/null
elif [[ $svc_owner == mine ]]; then
  mine+=(service/tomcat)
fi
kubectl rollout status deployment/tomcat --timeout=120s
step "kubectl exec deployment/tomcat -c tomcat -- /bin/bash -c 'mkdir -p webapps/ROOT; echo \"kt-connect demo v1\" > webapps/ROOT/index.html'"
kubectl exec deployment/tomcat -c tomcat -- /bin/bash -c 'mkdir -p webapps/ROOT; echo "kt-connect demo v1" > webapps/ROOT/index.html'
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
  kill -0 "$connect_pid" 2>/dev/null || stop "ktctl connect exited (its log is above)"
  sleep 1
done
grep -q "All looks good" "$work/connect.log" || stop "ktctl connect did not become ready in 180 s (its log is above)"
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

# --- cluster -> laptop ------------------------------------------------------------------------------
# The seed runs a second tomcat locally with Docker; no Docker engine runs here, so a plain HTTP server
# on 127.0.0.1:8080 serving the same page stands in for it.
step "docker run -d --name tomcat -p 8080:8080 tomcat:9   # stand-in: python3 -m http.server 8080 --bind 127.0.0.1"
mkdir -p "$work/local"
echo "kt-connect local v2" > "$work/local/index.html"
(cd "$work/local" && exec python3 -m http.server 8080 --bind 127.0.0.1 >"$work/local.log" 2>&1) &
bg_pids+=($!)
for _ in $(seq 1 50); do curl -s --noproxy '*' -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.2; done
curl -sS --noproxy '*' --max-time 5 http://127.0.0.1:8080/ >/dev/null || stop "the local stand-in server did not start on 127.0.0.1:8080 (port taken?)"

# Runs a ktctl command in the background and waits for its banner; its pid is left in $last_pid.
start_bg() {
  local banner=$1 name=$2; shift 2
  "$KTCTL" "$@" > "$work/$name.out" 2> >(tee "$work/$name.log" >&2) &
  last_pid=$!
  bg_pids+=("$last_pid")
  for _ in $(seq 1 180); do
    grep -qF "$banner" "$work/$name.log" 2>/dev/null && return 0
    kill -0 "$last_pid" 2>/dev/null || stop "ktctl $* exited (its log is above)"
    sleep 1
  done
  stop "ktctl $* did not print its banner in 180 s (its log is above)"
}
stop_bg() { kill -INT "$1"; wait "$1" || true; }

step "ktctl exchange tomcat --expose 8080"
start_bg "Now all request to service 'tomcat' will be redirected to local" exchange exchange tomcat --expose 8080
exchange_pid=$last_pid
step "curl http://tomcat:8080"
curl -sS --max-time 20 http://tomcat:8080
echo "[demo] Ctrl-C on the exchange puts the service back"
stop_bg "$exchange_pid"
step "curl http://tomcat:8080"
curl -sS --max-time 20 http://tomcat:8080

# --- mesh: only requests carrying the printed header reach the laptop ---------------------------------
step "ktctl mesh tomcat --expose 8080"
start_bg "Now you can access your service by header" mesh mesh tomcat --expose 8080
mesh_pid=$last_pid
header=$(sed -n "s/.*Now you can access your service by header '\([^']*\)'.*/\1/p" "$work/mesh.log" | tail -1)
[[ -n $header ]] || stop "ktctl mesh printed no header in its banner (its log is above)"
step "curl http://tomcat:8080"
curl -sS --max-time 20 http://tomcat:8080
step "curl -H '$header' http://tomcat:8080"
curl -sS --max-time 20 -H "$header" http://tomcat:8080
echo "[demo] Ctrl-C on the mesh removes its router, stuntman and shadow and puts the service back"
stop_bg "$mesh_pid"
step "curl http://tomcat:8080"
curl -sS --max-time 20 http://tomcat:8080
selector=$(kubectl get service tomcat -o 'jsonpath={.spec.selector}')
left=$(kubectl get pods,services -l control-by=kt -o name | grep -E '/tomcat-kt-(router|stuntman|mesh-)' || true)
[[ $selector == '{"app":"tomcat"}' && -z $left ]] \
  || stop "after the mesh: service tomcat selects $selector, left over: ${left:-nothing} (see \`ktctl recover tomcat\`)"
echo "[demo] service tomcat selects $selector again; no router, stuntman or mesh shadow left"

step "ktctl preview tomcat-v2 --expose 8080"
start_bg "Now you can access your local service in cluster by name 'tomcat-v2'" preview preview tomcat-v2 --expose 8080
preview_pid=$last_pid
step "curl http://tomcat-v2:8080"
curl -sS --max-time 20 http://tomcat-v2:8080

step "ktctl forward tomcat-v2 6060:8080"
start_bg "via 'localhost:6060'" forward forward tomcat-v2 6060:8080
forward_pid=$last_pid
step "curl http://localhost:6060"
curl -sS --max-time 20 http://localhost:6060
stop_bg "$forward_pid"
stop_bg "$preview_pid"
echo; echo "[demo] done: connect, exchange, mesh, preview and forward, without a TUN device, routes or sudo."
