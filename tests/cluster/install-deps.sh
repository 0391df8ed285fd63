#!/usr/bin/env bash
# Debian packages the cluster, the tests and the benchmarks need. Idempotent: installs only what is missing.
set -euo pipefail
PKGS=(containerd runc containernetworking-plugins iptables iproute2 conntrack socat ethtool
      dnsutils curl openssl debootstrap openssh-server openssh-client nginx-light chromium
      procps psmisc util-linux kmod gcc libc6-dev nodejs strace)
# strace: tests/unit/test_aio.py counts getpid syscalls per proxied connection.
# nodejs: tests/unit/test_pac.py evaluates the generated PAC file with node. A node installed some other
# way (nodesource, nvm) will do: then Debian's is not added next to it.
missing=()
for p in "${PKGS[@]}"; do
  [[ $p == nodejs ]] && command -v node >/dev/null && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[install-deps] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "[install-deps] Debian packages present"
