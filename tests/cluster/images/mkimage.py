"""Assemble a docker-archive tarball (what `docker save` writes) from layer tarballs.

`ctr images import` names the image after the manifest's RepoTags, so a full name given here is the
name the kubelet finds (tomcat:9 normalises to docker.io/library/tomcat:9).
"""

import argparse
import hashlib
import io
import json
import os
import tarfile
import time


def sha256_file(path: str) -> str:
    # Layer digests are cached next to the layer: hashing the 200 MB base layer on every run is waste.
    memo = path + ".sha256"
    st = os.stat(path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    try:
        with open(memo) as f:
            saved_stamp, digest = f.read().split()
        if saved_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with open(memo, "w") as f:
        f.write(f"{stamp} {digest}\n")
    return digest


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tag", action="append", required=True, help="full image name, repeatable")
    ap.add_argument("--layer", action="append", required=True, help="uncompressed layer tar, base first")
    ap.add_argument("--cmd", default=None, help="JSON list")
    ap.add_argument("--entrypoint", default=None, help="JSON list")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--expose", action="append", default=[], help="e.g. 8080/tcp")
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    digests = [sha256_file(p) for p in args.layer]
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *args.env]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": env,
            "WorkingDir": args.workdir,
            "Cmd": json.loads(args.cmd) if args.cmd else None,
            "Entrypoint": json.loads(args.entrypoint) if args.entrypoint else None,
            "ExposedPorts": {p: {} for p in args.expose} or None,
            "Labels": dict(kv.split("=", 1) for kv in args.label) or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/cluster/images"}
                    for _ in digests],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{
        "Config": config_name,
        "RepoTags": args.tag,
        "Layers": [f"{d}/layer.tar" for d in digests],
    }]
    # The config names every layer digest and setting, so an unchanged name means an unchanged archive.
    stamp = args.out + ".config"
    try:
        with open(stamp) as f:
            unchanged = f.read().strip() == config_name and os.path.exists(args.out)
    except OSError:
        unchanged = False
    if unchanged:
        return
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, config_name, config_bytes)
        seen = set()
        for d, path in zip(digests, args.layer, strict=True):
            if d in seen:
                continue
            seen.add(d)
            tar.add(path, arcname=f"{d}/layer.tar", recursive=False,
                    filter=_normalise)
        add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
    os.replace(tmp, args.out)
    with open(stamp, "w") as f:
        f.write(config_name + "\n")
    print(f"[images {time.strftime('%H:%M:%S')}] assembled {', '.join(args.tag)} -> {args.out}")


def _normalise(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


if __name__ == "__main__":
    main()
