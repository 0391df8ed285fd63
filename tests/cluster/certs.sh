#!/usr/bin/env bash
# Generates the cluster's CA, serving and client certificates and kubeconfigs under .cluster/pki and
# .cluster/conf. Kept across cluster-down/up so kubeconfigs handed to tests stay valid; regenerated only
# when missing. ECDSA P-256 because it is instant, and every component accepts it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mkdir -p "$PKI" "$CONF"
cd "$PKI"

key() { [[ -s $1.key ]] || openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null; }

if [[ ! -s ca.crt ]]; then
  key ca
  openssl req -x509 -new -key ca.key -subj "/CN=ktproxy-local-ca" -days 3650 -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# cert NAME SUBJECT EKU [SANS]
cert() {
  local name=$1 subj=$2 eku=$3 sans=${4:-}
  [[ -s $name.crt ]] && return 0
  key "$name"
  openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

api_sans="IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default"
api_sans+=",DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$DNS_DOMAIN"
cert apiserver "/CN=kube-apiserver" serverAuth "$api_sans"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert admin "/O=system:masters/CN=ktproxy-admin" clientAuth
cert controller-manager "/CN=system:kube-controller-manager" clientAuth
cert scheduler "/CN=system:kube-scheduler" clientAuth
cert kube-proxy "/CN=system:kube-proxy" clientAuth
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
[[ -s sa.key ]] || { key sa; openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null; }
chmod 600 ./*.key

# Absolute paths inside, so the kubeconfig works from any directory and can be copied by path.
kubeconfig() {
  local out=$1 user=$2
  cat > "$out" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: ktproxy-local
  cluster:
    server: $API_URL
    certificate-authority: $PKI/ca.crt
users:
- name: $user
  user:
    client-certificate: $PKI/$user.crt
    client-key: $PKI/$user.key
contexts:
- name: ktproxy-local
  context:
    cluster: ktproxy-local
    user: $user
    namespace: default
current-context: ktproxy-local
YAML
}
kubeconfig "$KUBECONFIG_ADMIN" admin
for c in controller-manager scheduler kube-proxy kubelet; do kubeconfig "$CONF/$c.kubeconfig" "$c"; done
