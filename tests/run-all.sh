#!/usr/bin/env bash
# `make test`: every level of tests. Level 1 (unit) and 2 (integration, network namespaces) need no
# cluster; level 3 (e2e) runs against the local cluster, which this script brings up when it is not
# running and tears down again afterwards (set KTPROXY_KEEP_CLUSTER=1 to keep it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
bash tests/cluster/install-deps.sh || { echo "test: installing Debian packages failed" >&2; exit 1; }

started_cluster=0
if [[ "${KTPROXY_SKIP_CLUSTER:-0}" != 1 ]]; then
  if ! bash tests/cluster/status.sh >/dev/null 2>&1; then
    echo "[test] bringing up the local cluster (cold: builds Kubernetes, tens of minutes)"
    bash tests/cluster/up.sh || { echo "test: the local cluster did not come up" >&2; exit 1; }
    started_cluster=1
  else
    # Running already: refresh images so the shadow image matches this checkout.
    bash tests/cluster/images/build.sh || exit 1
  fi
fi
cleanup() {
  if [[ $started_cluster == 1 && "${KTPROXY_KEEP_CLUSTER:-0}" != 1 ]]; then bash tests/cluster/down.sh || true; fi
}
trap cleanup EXIT

log=$(mktemp)
$PY -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
cleanup
trap - EXIT
# The cluster's shutdown lines come after pytest's; repeat its summary so it stays the closing line.
summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$log" | tail -1)
rm -f "$log"
[[ -n "$summary" ]] && echo "$summary"
exit "$rc"
