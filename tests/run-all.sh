#!/usr/bin/env bash
# `make test`: every level of tests. Level 1 (unit) and 2 (integration, network namespaces) need no
# cluster; level 3 (e2e) runs against the local cluster, which this script brings up when it is not
# running and tears down again afterwards (set KTPROXY_KEEP_CLUSTER=1 to keep it).
# Every level must run: a level that skipped (no cluster, no network namespaces, no node) or ran no test
# fails the run with one line naming it (tests/conftest.py, the level gate). KTPROXY_SKIP_CLUSTER=1 drops
# the e2e level from what is promised; KTPROXY_REQUIRE_LEVELS overrides the list (empty: no gate).
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

if [[ -z ${KTPROXY_REQUIRE_LEVELS+set} ]]; then
  KTPROXY_REQUIRE_LEVELS=unit,integration,e2e
  if [[ "${KTPROXY_SKIP_CLUSTER:-0}" == 1 ]]; then
    KTPROXY_REQUIRE_LEVELS=unit,integration
    echo "[test] KTPROXY_SKIP_CLUSTER=1: the e2e level is not required"
  fi
fi
export KTPROXY_REQUIRE_LEVELS

log=$(mktemp)
$PY -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
cleanup
trap - EXIT
# The cluster's shutdown lines come after pytest's; repeat its summary so it stays the closing line.
summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$log" | tail -1)
gate=$(grep -E "^make test: level " "$log")
rm -f "$log"
[[ -n "$gate" ]] && echo "$gate" >&2
[[ -n "$summary" ]] && echo "$summary"
exit "$rc"
