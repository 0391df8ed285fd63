#!/usr/bin/env bash
# (Re)builds the cluster's images as docker-archive tarballs and imports the changed ones into the
# cluster's containerd (namespace k8s.io). Safe to run alone: `bash tests/cluster/images/build.sh`
# refreshes the shadow image after shadow_image/ changed (its tag stays 0.1.0; a content hash decides).
#   registry.k8s.io/pause:3.10        static pause binary (the pod sandbox)
#   docker.io/ktproxy/base:0.1.0      Debian bookworm minbase + python3 (for test pods)
#   docker.io/library/tomcat:9        demo-http, a STAND-IN for the quickstart's tomcat (not Tomcat)
#   docker.io/ktproxy/shadow:0.1.0    base + /opt/ktproxy venv (asyncssh, uvloop) + shadow_image + ktwire;
#                                     ENTRYPOINT python -m shadow_image, so a pod's `args` are its flags
#                                     and a pod's `command` still replaces it entirely
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
CACHE="${KTPROXY_CLUSTER_CACHE:-$HOME/.cache/ktproxy-cluster}"
STATE="${KTPROXY_CLUSTER_DIR:-$REPO/.cluster}"
OUT="$CACHE/images"
ROOT="$CACHE/rootfs/bookworm"
SOCK="$STATE/run/containerd.sock"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
# Pinned to requirements.lock so the shadow runs what the unit and integration tests ran.
lock_pin() { grep -i "^$1==" "$REPO/requirements.lock" || echo "$1"; }
SHADOW_REQS=("$(lock_pin asyncssh)" "$(lock_pin uvloop)" "$(lock_pin httptools)" "$(lock_pin h2)" "$(lock_pin hpack)" "$(lock_pin hyperframe)")

log() { echo "[images $(date +%H:%M:%S)] $*"; }
die() { echo "images: $*" >&2; exit 1; }
mkdir -p "$OUT" "$STATE/images"

bash "$HERE/rootfs.sh"
pyver=$(basename "$(ls -d "$ROOT"/usr/lib/python3.[0-9]* | head -1)")
SITE="/opt/ktproxy/lib/$pyver/site-packages"

# Reproducible small layers: fixed owner and mtime, sorted, so unchanged inputs give unchanged digests.
pack() { tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$1" -cf "$2.tmp" . && mv "$2.tmp" "$2"; }
hash_of() { sha256sum | cut -c1-16; }

# --- pause ---------------------------------------------------------------------------------------
pause_hash=$(cat "$HERE/pause.c" | hash_of)
if [[ "$(cat "$OUT/pause.hash" 2>/dev/null)" != "$pause_hash" ]]; then
  log "building pause"
  d=$(mktemp -d); gcc -static -Os -s -o "$d/pause" "$HERE/pause.c" || die "gcc -static failed (libc6-dev?)"
  pack "$d" "$OUT/pause-layer.tar"; rm -rf "$d"; echo "$pause_hash" > "$OUT/pause.hash"
fi

# --- demo-http (tomcat:9 stand-in) ----------------------------------------------------------------
demo_hash=$(cat "$HERE/demo_http.py" | hash_of)
if [[ "$(cat "$OUT/demo.hash" 2>/dev/null)" != "$demo_hash" ]]; then
  log "building demo-http layer"
  d=$(mktemp -d)
  # webapps exists and ROOT does not, like the real image: the quickstart creates ROOT itself.
  mkdir -p "$d/usr/local/tomcat/webapps" "$d/usr/local/bin"
  install -m 0755 "$HERE/demo_http.py" "$d/usr/local/bin/demo-http"
  pack "$d" "$OUT/demo-layer.tar"; rm -rf "$d"; echo "$demo_hash" > "$OUT/demo.hash"
fi

# --- shadow venv (changes only with the pinned requirements) ---------------------------------------
venv_hash=$( (printf '%s\n' "${SHADOW_REQS[@]}"; cat "$CACHE/rootfs/.done"; sed -n '/--- shadow venv/,/--- shadow app/p' "$0") | hash_of)
if [[ "$(cat "$OUT/venv.hash" 2>/dev/null)" != "$venv_hash" ]]; then
  log "building shadow venv: ${SHADOW_REQS[*]}"
  wheels="$CACHE/wheels"; mkdir -p "$wheels"
  # Wheels are fetched by the host's pip (same CPython minor and glibc as bookworm) so the chroot
  # needs no network at all.
  "$PY" -m pip download -q --only-binary=:all: -d "$wheels" "${SHADOW_REQS[@]}" \
    || die "pip download of ${SHADOW_REQS[*]} failed"
  work=$(mktemp -d); mkdir -p "$work/upper" "$work/work" "$work/merged"
  mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$work/upper,workdir=$work/work" "$work/merged"
  cleanup_overlay() { umount "$work/merged" 2>/dev/null || true; rm -rf "$work"; }
  trap cleanup_overlay EXIT
  mkdir -p "$work/merged/tmp/wheels"; cp "$wheels"/*.whl "$work/merged/tmp/wheels/"
  cenv=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
  chroot "$work/merged" "${cenv[@]}" /usr/bin/python3 -m venv /opt/ktproxy
  chroot "$work/merged" "${cenv[@]}" /opt/ktproxy/bin/python -m pip install -q --no-index \
    --disable-pip-version-check --find-links /tmp/wheels "${SHADOW_REQS[@]}"
  # An unprivileged user so pods can run the shadow with runAsUser 10001 and still have a home.
  chroot "$work/merged" "${cenv[@]}" useradd -u 10001 -U -m -d /home/ktproxy -s /usr/sbin/nologin ktproxy
  umount "$work/merged"
  rm -rf "$work/upper/tmp" "$work/upper/root" "$work/upper/var/log" "$work/upper/var/cache"
  # overlayfs whiteouts (char 0:0) would mean we deleted base files; a docker layer can't carry them.
  [[ -z "$(find "$work/upper" -type c | head -1)" ]] || die "shadow venv build deleted base files"
  pack "$work/upper" "$OUT/venv-layer.tar"
  trap - EXIT; rm -rf "$work"
  echo "$venv_hash" > "$OUT/venv.hash"
fi

# --- shadow app (changes with shadow_image/ and ktwire/) ----------------------------------------------------
app_hash=$( (cd "$REPO" && find shadow_image ktwire -type f -not -path '*/__pycache__/*' -not -name '*.pyc' \
             -print0 | sort -z | xargs -0r sha256sum) | hash_of)
if [[ "$(cat "$OUT/app.hash" 2>/dev/null)" != "$app_hash" ]]; then
  log "building shadow app layer from shadow_image/ and ktwire/ ($app_hash)"
  d=$(mktemp -d); mkdir -p "$d$SITE"
  (cd "$REPO" && find shadow_image ktwire -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 \
     | xargs -0r cp --parents -t "$d$SITE")
  pack "$d" "$OUT/app-layer.tar"; rm -rf "$d"; echo "$app_hash" > "$OUT/app.hash"
fi

# --- archives -----------------------------------------------------------------------------------
mk() { "$PY" "$HERE/mkimage.py" "$@"; }
mk --tag registry.k8s.io/pause:3.10 --layer "$OUT/pause-layer.tar" --entrypoint '["/pause"]' \
   --out "$OUT/pause.tar" >/dev/null
mk --tag docker.io/ktproxy/base:0.1.0 --layer "$ROOT/../base-layer.tar" --cmd '["/bin/bash"]' \
   --env LANG=C.UTF-8 --out "$OUT/base.tar" >/dev/null
mk --tag docker.io/library/tomcat:9 --layer "$ROOT/../base-layer.tar" --layer "$OUT/demo-layer.tar" \
   --workdir /usr/local/tomcat --expose 8080/tcp --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 \
   --label org.ktproxy.stand-in=demo-http \
   --cmd '["/usr/bin/python3", "/usr/local/bin/demo-http"]' --out "$OUT/tomcat.tar" >/dev/null
mk --tag docker.io/ktproxy/shadow:0.1.0 --layer "$ROOT/../base-layer.tar" --layer "$OUT/venv-layer.tar" \
   --layer "$OUT/app-layer.tar" --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 \
   --entrypoint '["/opt/ktproxy/bin/python", "-m", "shadow_image"]' --out "$OUT/shadow.tar" >/dev/null

# --- import -------------------------------------------------------------------------------------
if [[ ! -S "$SOCK" ]] || ! ctr -a "$SOCK" version >/dev/null 2>&1; then
  log "archives ready in $OUT; the cluster's containerd is not running, so import happens at cluster-up"
  exit 0
fi
present=$(ctr -a "$SOCK" -n k8s.io images ls -q)
for img in pause:registry.k8s.io/pause:3.10 base:docker.io/ktproxy/base:0.1.0 \
           tomcat:docker.io/library/tomcat:9 shadow:docker.io/ktproxy/shadow:0.1.0; do
  f="${img%%:*}"; name="${img#*:}"
  # The archive's manifest names its config by content hash, so the config file name is the identity.
  id=$(cat "$OUT/$f.tar.config")
  if grep -qxF "$name" <<<"$present" && [[ "$(cat "$STATE/images/$f.id" 2>/dev/null)" == "$id" ]]; then
    continue
  fi
  log "importing $name"
  ctr -a "$SOCK" -n k8s.io images import "$OUT/$f.tar" >/dev/null || die "ctr import of $name failed"
  echo "$id" > "$STATE/images/$f.id"
done
log "images present: pause:3.10, ktproxy/base:0.1.0, tomcat:9 (demo-http stand-in), ktproxy/shadow:0.1.0"
