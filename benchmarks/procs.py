"""Processes the benchmarks start: the target, the shadow server + ktproxy data plane, OpenSSH sshd +
`ssh -D`. Every process is ours, started with Popen and stopped by its own pid; everything listens on
127.0.0.0/8 only.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

_serial = itertools.count()

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
OPENSSH_CIPHER = "aes128-gcm@openssh.com"


class Skip(Exception):
    """A case (or one yardstick of it) cannot run here; the message says why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _raise_nofile() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))


@dataclass
class Procs:
    """Owns the processes it started; `stop()` ends each by its pid (SIGTERM, then SIGKILL)."""

    workdir: Path
    started: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, preexec_fn=_raise_nofile, **kw)
        log.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)

    def tail(self, name: str, n: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# -- keys ---------------------------------------------------------------------------------------

@dataclass
class Keys:
    client: Path  # private key (OpenSSH format), for ktproxy and ssh
    client_pub: Path
    host: Path  # host private key
    host_pub: Path
    known_hosts: Path


def make_keys(workdir: Path) -> Keys:
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    k = Keys(workdir / "id_client", workdir / "id_client.pub", workdir / "host_key", workdir / "host_key.pub",
             workdir / "known_hosts")
    client.write_private_key(str(k.client))
    client.write_public_key(str(k.client_pub))
    host.write_private_key(str(k.host))
    host.write_public_key(str(k.host_pub))
    for p in (k.client, k.host):
        p.chmod(0o600)
    return k


# -- the processes --------------------------------------------------------------------------------

def start_target(procs: Procs, host: str = "127.0.0.2") -> tuple[subprocess.Popen, int]:
    port_file = procs.workdir / "target.port"
    port_file.unlink(missing_ok=True)
    proc = procs.spawn("target", [PY, "-m", "benchmarks.target", "--host", host, "--port-file", str(port_file)])
    wait_for(port_file.exists, 15, "benchmark target", proc)
    return proc, int(port_file.read_text())


@dataclass
class Tuning:
    """Knobs for the tuning study, applied by benchmarks.launch in the ktproxy processes."""

    uvloop: bool = True
    cipher: str | None = None
    window: int | None = None
    pktsize: int | None = None
    chunk: int | None = None
    nodelay: bool = True
    fastpath: bool = False
    asyncssh_ignore: bool = False  # asyncssh's per-packet empty SSH_MSG_IGNORE, which the shipped code drops
    asyncssh_recv: bool = False  # asyncssh's own receive path, which the shipped code feeds a packet at a time
    asyncssh_default: tuple[str, ...] = ()  # more ktwire.sshwire patches left out (names in sshwire.PATCHES)

    def argv(self) -> list[str]:
        a: list[str] = []
        if not self.uvloop:
            a.append("--no-uvloop")
        if self.cipher:
            a += ["--cipher", self.cipher]
        if self.window:
            a += ["--window", str(self.window)]
        if self.pktsize:
            a += ["--pktsize", str(self.pktsize)]
        if self.chunk:
            a += ["--chunk", str(self.chunk)]
        if not self.nodelay:
            a.append("--no-nodelay")
        if self.fastpath:
            a.append("--fastpath")
        if self.asyncssh_ignore:
            a.append("--asyncssh-ignore")
        if self.asyncssh_recv:
            a.append("--asyncssh-recv")
        for name in self.asyncssh_default:
            a += ["--asyncssh-default", name]
        return a


@dataclass
class KtProxy:
    shadow: subprocess.Popen
    dataplane: subprocess.Popen
    proxy_port: int


def start_ktproxy(procs: Procs, keys: Keys, tuning: Tuning | None = None,
                  extra_dataplane: list[str] | None = None) -> KtProxy:
    """`extra_dataplane`: more data-plane flags (later flags win: `--dns-port 0 --cluster-dns H:P`)."""
    tuning = tuning or Tuning()
    tag = str(next(_serial))
    port_file = procs.workdir / f"shadow{tag}.port"
    ready = procs.workdir / f"dataplane{tag}.ready"
    port_file.unlink(missing_ok=True)
    ready.unlink(missing_ok=True)
    shadow = procs.spawn(f"shadow{tag}", [
        PY, "-m", "benchmarks.launch", "shadow", *tuning.argv(), "--",
        "--listen", "127.0.0.1:0", "--authorized-keys", str(keys.client_pub), "--host-key", str(keys.host),
        "--port-file", str(port_file)])
    wait_for(lambda: port_file.exists() and port_file.read_text().strip() != "", 20, "shadow server", shadow)
    ssh_port = int(port_file.read_text())
    dataplane = procs.spawn(f"dataplane{tag}", [
        PY, "-m", "benchmarks.launch", "dataplane", *tuning.argv(), "--",
        "--ssh", f"127.0.0.1:{ssh_port}", "--identity", str(keys.client), "--host-key-pub", str(keys.host_pub),
        "--cidr", "127.0.0.0/8", "--proxy-port", "0", "--dns-port", "-1", "--ready-file", str(ready),
        *(extra_dataplane or [])])
    try:
        wait_for(lambda: ready.exists() and ready.read_text().strip() != "", 20, "ktproxy data plane", dataplane)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{procs.tail(f'dataplane{tag}')}") from None
    return KtProxy(shadow, dataplane, int(ready.read_text().split()[0]))


def start_asyncssh_socks(procs: Procs, keys: Keys) -> KtProxy:
    """asyncssh forward_socks, both ends at asyncssh's defaults (window 2 MB, packets 32 KB)."""
    tag = str(next(_serial))
    port_file = procs.workdir / f"shadow{tag}.port"
    ready = procs.workdir / f"asyncssh{tag}.port"
    shadow = procs.spawn(f"shadow{tag}", [
        PY, "-m", "benchmarks.launch", "shadow", "--window", str(2 * 1024 * 1024), "--pktsize", "32768",
        "--asyncssh-ignore", "--asyncssh-recv", "--",
        "--listen", "127.0.0.1:0", "--authorized-keys", str(keys.client_pub), "--host-key", str(keys.host),
        "--port-file", str(port_file)])
    wait_for(lambda: port_file.exists() and port_file.read_text().strip() != "", 20, "shadow server", shadow)
    client = procs.spawn(f"asyncssh{tag}", [
        PY, "-m", "benchmarks.asyncssh_socks", "--ssh", f"127.0.0.1:{port_file.read_text()}",
        "--identity", str(keys.client), "--host-key-pub", str(keys.host_pub), "--port-file", str(ready)])
    wait_for(ready.exists, 20, "asyncssh forward_socks", client)
    return KtProxy(shadow, client, int(ready.read_text()))


@dataclass
class OpenSSH:
    sshd: subprocess.Popen
    client: subprocess.Popen
    socks_port: int


def start_openssh(procs: Procs, keys: Keys, cipher: str = OPENSSH_CIPHER) -> OpenSSH:
    """Our own sshd (own config, host key, authorized keys, pid file) and `ssh -D` against it."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin) or not shutil.which("ssh"):
        raise Skip("OpenSSH not installed (Debian: openssh-server, openssh-client)")
    if os.geteuid() != 0:
        raise Skip("sshd with privilege separation needs root here")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    wd = procs.workdir
    port = free_port()
    config = wd / "sshd_config"
    user = os.environ.get("USER") or "root"
    config.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {keys.host}
PidFile {wd / 'sshd.pid'}
AuthorizedKeysFile {keys.client_pub}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {user}
AllowTcpForwarding yes
PermitOpen any
X11Forwarding no
Compression no
Ciphers {cipher}
UseDNS no
LogLevel ERROR
""")
    sshd = procs.spawn("sshd", [sshd_bin, "-D", "-e", "-f", str(config)])
    wait_for(lambda: port_open("127.0.0.1", port), 10, "sshd", sshd)
    keys.known_hosts.write_text(f"[127.0.0.1]:{port} {keys.host_pub.read_text().strip()}\n")
    socks_port = free_port()
    client = procs.spawn("ssh-D", [
        "ssh", "-F", "/dev/null", "-N", "-D", f"127.0.0.1:{socks_port}", "-p", str(port), "-i", str(keys.client),
        "-o", f"UserKnownHostsFile={keys.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", f"Ciphers={cipher}", "-o", "Compression=no", "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "ExitOnForwardFailure=yes", f"{user}@127.0.0.1"])
    try:
        wait_for(lambda: port_open("127.0.0.1", socks_port), 15, "ssh -D", client)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{procs.tail('ssh-D')}\n{procs.tail('sshd')}") from None
    return OpenSSH(sshd, client, socks_port)


def session_pids(openssh: OpenSSH) -> list[int]:
    """The sshd processes serving our ssh -D session (children of our sshd), for RSS."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(openssh.sshd.pid)], capture_output=True, text=True)
    pids = [int(x) for x in out.stdout.split()]
    more = []
    for pid in pids:
        o = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
        more += [int(x) for x in o.stdout.split()]
    return pids + more
