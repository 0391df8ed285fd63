"""The yardsticks `make bench` runs itself, and one line for each it could not:

    bench: yardstick nginx not run: nginx not found and apt-get install nginx-light failed: ...

Before the cases, `prepare()` installs what it can (Debian packages via apt-get, as root: openssh-server
+ openssh-client for OpenSSH `ssh -D`, nginx-light for the mesh's nginx; kt-connect v0.3.7 from its
public Go module source by benchmarks/ktconnect/build.sh) and records why a yardstick cannot run. The
cases record what fails later (`Context.yardstick_missing`). At the end of the run `lines()` prints one
line per yardstick, the first reason only.

    python -m benchmarks.yardsticks [--no-install] [--case NAME...]   # just the check, no measurement
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

OPENSSH = "OpenSSH ssh -D"
NGINX = "nginx"
PORT_FORWARD = "kubectl port-forward"
KTCONNECT = "kt-connect v0.3.7"
COREDNS = "CoreDNS"

# Which yardsticks each case measures against (cases not listed have none: tuning).
BY_CASE: dict[str, tuple[str, ...]] = {
    "loopback": (OPENSSH,),
    "memory": (OPENSSH,),
    "mesh": (NGINX,),
    "cluster-dataplane": (PORT_FORWARD, KTCONNECT),
    "cluster-dns": (COREDNS,),
    "cluster-startup": (KTCONNECT,),
    "cluster-mesh": (NGINX,),
    "cluster-reverse": (KTCONNECT, PORT_FORWARD),
}
CLUSTER_YARDSTICKS = (PORT_FORWARD, KTCONNECT, COREDNS)
APT_PACKAGES = {OPENSSH: ("openssh-server", "openssh-client"), NGINX: ("nginx-light",)}


def line(name: str, why: str) -> str:
    return f"bench: yardstick {name} not run: {why}"


def which(prog: str, path: str | None = None) -> str | None:
    """`prog` on `path` (default: PATH plus /usr/sbin and /sbin, where Debian puts sshd and nginx)."""
    if path is None:
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(prog, path=path)


def nginx_bin(path: str | None = None) -> str | None:
    return which("nginx", path)


def check_openssh(path: str | None = None) -> str | None:
    missing = [p for p in ("sshd", "ssh") if which(p, path) is None]
    if missing:
        return f"{' and '.join(missing)} not found (Debian: openssh-server, openssh-client)"
    if os.geteuid() != 0:
        return "not root: sshd with privilege separation needs root"
    return None


def check_nginx(path: str | None = None) -> str | None:
    return None if nginx_bin(path) else "nginx not found (Debian: nginx-light)"


def check_cluster() -> str | None:
    """The local cluster (make cluster-up): kubectl port-forward, CoreDNS and kt-connect need it."""
    if not (REPO / ".cluster" / "kubeconfig").exists():
        return "no cluster (.cluster/kubeconfig missing: make cluster-up)"
    if not (REPO / ".cluster" / "bin" / "kubectl").exists():
        return "no cluster (.cluster/bin/kubectl missing: make cluster-up)"
    return None


def apt_install(packages: Iterable[str], apt_get: str = "apt-get") -> str | None:
    """None when installed; else the reason, one line. Tries once as is, then after an `apt-get update`."""
    pkgs = list(packages)
    if os.geteuid() != 0:
        return f"not root, cannot apt-get install {' '.join(pkgs)}"
    if shutil.which(apt_get) is None:
        return f"no apt-get here to install {' '.join(pkgs)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = [apt_get, "install", "-y", "-q", "--no-install-recommends", *pkgs]
    err = ""
    for attempt in range(2):
        if attempt:
            subprocess.run([apt_get, "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"apt-get install {' '.join(pkgs)} failed: {exc}"
        if r.returncode == 0:
            return None
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        err = lines[-1] if lines else f"exit status {r.returncode}"
    return f"apt-get install {' '.join(pkgs)} failed: {err}"


class Yardsticks:
    """Why each yardstick could not run (first reason wins), in the order they were found missing."""

    def __init__(self) -> None:
        self.missing: dict[str, str] = {}

    def add(self, name: str, why: str) -> None:
        why = " ".join(str(why).split())  # one line, whatever the reason's text
        self.missing.setdefault(name, why)

    def lines(self) -> list[str]:
        return [line(n, w) for n, w in self.missing.items()]

    def prepare(self, cases: Iterable[str], *, install: bool = True, quick: bool = False, path: str | None = None,
                apt: Callable[[Iterable[str]], str | None] = apt_install,
                ktconnect_available: Callable[[], tuple[bool, str]] | None = None,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        """Install what the selected cases' yardsticks need, where it can; record the rest."""
        wanted = list(dict.fromkeys(y for c in cases for y in BY_CASE.get(c, ())))
        checks = {OPENSSH: lambda: check_openssh(path), NGINX: lambda: check_nginx(path)}
        for name in (OPENSSH, NGINX):
            if name not in wanted:
                continue
            why = checks[name]()
            if why is None or (why.startswith("not root") and name == OPENSSH):
                if why:
                    self.add(name, why)
                continue
            if not install:
                self.add(name, f"{why}; not installing (--no-install)")
                continue
            log(f"[bench] {name} yardstick: {why}; installing {' '.join(APT_PACKAGES[name])} with apt-get")
            failed = apt(APT_PACKAGES[name])
            if failed:
                self.add(name, f"{why.split(' (')[0]} and {failed}")
            elif (still := checks[name]()) is not None:
                self.add(name, f"installed {' '.join(APT_PACKAGES[name])} but still: {still}")
        cluster_wanted = [y for y in wanted if y in CLUSTER_YARDSTICKS]
        if not cluster_wanted:
            return
        if (why := check_cluster()) is not None:
            for name in cluster_wanted:
                self.add(name, why)
            return
        if KTCONNECT in wanted:
            if quick:
                self.add(KTCONNECT, "not started in --quick (its build and start-up take minutes)")
            else:
                if ktconnect_available is None:
                    from benchmarks import ktconnect

                    def ktconnect_available() -> tuple[bool, str]:
                        return ktconnect.available(build=install)  # builds it from source when missing
                ok, why = ktconnect_available()
                if not ok:
                    self.add(KTCONNECT, why)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m benchmarks.yardsticks", description=__doc__.split("\n")[0])
    p.add_argument("--no-install", action="store_true", help="only check: install nothing, build nothing")
    p.add_argument("--case", nargs="+", metavar="NAME", help="only these cases' yardsticks (default: all)")
    args = p.parse_args(argv)
    y = Yardsticks()
    y.prepare(args.case or list(BY_CASE), install=not args.no_install)
    for ln in y.lines():
        print(ln)
    if not y.missing:
        print("bench: every yardstick can run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
