"""Mesh marks: the header each running `ktctl mesh --auto-header` wants on this user's own requests.

kt-connect tells its users to add the mesh header with a browser plugin. Here the mesh command publishes
one small JSON file per run under ~/.ktproxy/mesh-marks/ (its pid inside), and `ktctl connect`'s HTTP
proxy adds that header to plain-HTTP requests it forwards to the meshed service, so this user's browser
and curl reach their own version while nobody else's traffic changes. Only absolute-URI requests
through the HTTP proxy can be given a header: CONNECT tunnels and SOCKS streams are opaque bytes.

Writers: publish() and withdraw(), by the mesh command. Reader: MeshMarks, held by the proxy; it looks
at the directory's mtime on each request and re-reads the files only when that changed, and it ignores
a mark whose process is gone, so a SIGKILLed mesh stops changing traffic even though its file stays.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ktproxy.routing import normalise_name, parse_ip
from ktwire.routes import is_route

log = logging.getLogger("ktproxy.mesh")

FORMAT = 1
MAX_FILE = 16 * 1024  # a mark is a few hundred bytes; anything bigger was not written by publish()
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Directory mtimes tick coarsely (a jiffy, up to 10 ms): a change in the same tick as the last read
# leaves the mtime unchanged, so a listing this recent is not trusted (git's "racily clean" rule).
RACY_NS = 100_000_000
# How often a matching mark's process is checked beyond a signal-0 probe (its start time, against a
# reused pid); the probe itself runs on every match, so a killed mesh is noticed at once.
START_CHECK_INTERVAL = 1.0


# The mesh command's --auto-header help, here so the flag and what the proxy does cannot drift apart.
AUTO_HEADER_HELP = ("add this mesh's header by itself to the plain-HTTP requests this user's `ktctl connect` "
                    "forwards to the service through its HTTP proxy (http_proxy=...), unless they carry the "
                    "header already: your curl and browser reach your version, nobody else's traffic changes. "
                    "Not HTTPS, CONNECT tunnels or SOCKS clients (their bytes are not the proxy's to edit). "
                    "Off by default")


def marks_dir(home: Path | None = None) -> Path:
    """~/.ktproxy/mesh-marks of the user running this process (connect and mesh run as the same user)."""
    return (home if home is not None else Path.home()) / ".ktproxy" / "mesh-marks"


@dataclass(frozen=True)
class Mark:
    """What one mesh run asks for: requests to SERVICE.NAMESPACE on one of `ports` carry KEY: VALUE."""

    namespace: str
    service: str
    cluster_ip: str | None
    ports: tuple[int, ...]
    key: str
    value: str
    pid: int
    started: int | None  # the process's start time (Linux /proc clock ticks): tells a reused pid apart

    @property
    def header(self) -> tuple[str, str]:
        return self.key, self.value

    def names(self, namespace: str, domain: str) -> set[str]:
        """The host names that mean this service for a client whose search list starts at `namespace`."""
        full = f"{self.service}.{self.namespace}"
        out = {full, f"{full}.svc", f"{full}.svc.{domain}"}
        if self.namespace == namespace:
            out.add(self.service)
        return out

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "pid": self.pid, "started": self.started,
                           "namespace": self.namespace, "service": self.service, "cluster_ip": self.cluster_ip,
                           "ports": list(self.ports), "key": self.key, "value": self.value}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Mark:
        """The mark in `text`; ValueError for anything publish() would not have written."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a mesh mark of this format")
        pid, started, ports = data.get("pid"), data.get("started"), data.get("ports")
        if not _is_int(pid) or pid <= 0 or not (started is None or _is_int(started)):
            raise ValueError("bad pid")
        if not isinstance(ports, list):
            raise ValueError("bad ports")
        return _checked(data.get("namespace"), data.get("service"), data.get("cluster_ip"), ports,
                        data.get("key"), data.get("value"), pid, started)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked(namespace: object, service: object, cluster_ip: object, ports: list[object], key: object,
             value: object, pid: int, started: int | None) -> Mark:
    """A Mark whose every field is safe to put in a request head (is_route: the router's own rule)."""
    for what, name in (("namespace", namespace), ("service", service)):
        if not isinstance(name, str) or not _LABEL.match(name):
            raise ValueError(f"{what} {name!r} is not a DNS label")
    if not (isinstance(key, str) and isinstance(value, str) and is_route(key, value)):
        raise ValueError(f"{key!r}: {value!r} is not a mesh route (lower-case header name, DNS-label value)")
    if not ports or not all(_is_int(p) and 0 < p < 65536 for p in ports):  # type: ignore[operator]
        raise ValueError(f"ports {ports!r}: need one or more port numbers")
    ip: str | None = None
    if cluster_ip not in (None, "", "None"):
        try:
            ip = str(ipaddress.ip_address(cluster_ip))  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"cluster IP {cluster_ip!r} is not an address") from None
    return Mark(namespace, service, ip, tuple(dict.fromkeys(ports)), key, value, pid,  # type: ignore[arg-type]
                started)


# -- the mesh command's side ---------------------------------------------------------------------------
def publish(namespace: str, service: str, cluster_ip: str | None, ports: list[int], key: str, value: str,
            *, directory: Path | None = None) -> Path:
    """Write this process's mark (atomically, mode 0600, in a 0700 directory); its path, for withdraw().

    ValueError for a mark no proxy would apply; OSError when the directory cannot be written. Marks of
    processes that are gone (a SIGKILLed mesh) are removed on the way.
    """
    mark = _checked(namespace, service, cluster_ip, list(ports), key, value, os.getpid(), process_start(os.getpid()))
    d = directory if directory is not None else marks_dir()
    _private_dir(d.parent)
    _private_dir(d)
    _sweep(d)
    path = d / f"{namespace}.{service}.{key}.{value}.{mark.pid}.json"
    # A reader sees the old file or the whole new one, never half of it: write aside, then rename.
    tmp = d / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(mark.to_json())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def withdraw(path: Path) -> None:
    """Remove a mark publish() wrote; one already gone (clean, another withdraw) is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _uid() -> int | None:
    """This user's id; None where the OS has none (Windows: no os.getuid, st_uid is always 0 and who owns
    a file is a matter of ACLs; the directory is in the user's own profile there)."""
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None


def _private_dir(d: Path) -> None:
    """`d` exists, is a directory this user owns, and only this user can read or change it."""
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700)
    st = os.lstat(d)
    uid = _uid()
    if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
        raise PermissionError(errno.EPERM, "not a directory owned by this user", str(d))
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)


def _sweep(d: Path) -> None:
    for path in d.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if not is_alive(Mark.from_json(path.read_text(encoding="utf-8"))):
                path.unlink()


# -- whether the publisher still runs ------------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22); None without /proc."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields after `(comm)` (comm may hold spaces and parentheses: split at the last one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return text[text.rfind(")") + 1:].split()


# Windows: OpenProcess access right, GetLastError code and GetExitCodeProcess value of a running process.
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_ACCESS_DENIED = 5
_STILL_ACTIVE = 259


def _kernel32() -> Any:
    import ctypes

    return ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]


def _last_error() -> int:
    import ctypes

    return int(ctypes.get_last_error())  # type: ignore[attr-defined]


def _windows_pid_running(pid: int) -> bool:
    """OpenProcess + GetExitCodeProcess (os.kill(pid, 0) on Windows sends CTRL_C_EVENT, it probes
    nothing): a process we may not open exists all the same."""
    import ctypes

    kernel32 = _kernel32()
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return _last_error() == _ERROR_ACCESS_DENIED
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # it exists; its state is unknown
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists. POSIX: signal 0 (a permission error means it does);
    Windows: see _windows_pid_running."""
    if sys.platform == "win32":
        try:
            return _windows_pid_running(pid)
        except (OSError, AttributeError):  # no kernel32 to ask: keep the mark rather than drop a live one
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def is_alive(mark: Mark) -> bool:
    """The mark's own process still runs: the pid exists, is not a zombie and started when it did."""
    if not pid_running(mark.pid):
        return False
    fields = _proc_stat(mark.pid)
    if fields is None:  # no /proc (macOS): the signal probe is all there is
        return True
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return mark.started is None or (len(fields) > 19 and fields[19] == str(mark.started))


# -- connect's side --------------------------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    mark: Mark
    mtime_ns: int
    checked: float = field(default=float("-inf"))  # monotonic time of the last full liveness check


class MeshMarks:
    """The mesh header for a request target, as the proxy asks per request.

    `namespace` and `domain` are connect's: the short name `svc` means the service only for marks in
    connect's namespace (as the shadow pod's search list resolves it).
    """

    def __init__(self, namespace: str, domain: str, directory: Path | None = None) -> None:
        self.namespace = normalise_name(namespace)
        self.domain = normalise_name(domain)
        if directory is None:
            try:
                directory = marks_dir()
            except RuntimeError:  # no home directory: no mesh of this user can have published a mark
                directory = Path("/nonexistent/ktproxy/mesh-marks")
        self.directory = directory
        self._stamp: tuple[int, int, int] | None = None
        self._racy = False
        self._by_name: dict[str, list[_Entry]] = {}
        self._by_ip: dict[str, list[_Entry]] = {}
        self._applied: dict[str, Mark] = {}  # marks already announced in the log, by file name
        self._dead: set[str] = set()

    def header_for(self, host: str, port: int) -> tuple[str, str] | None:
        """(key, value) to add to a request for host:port, or None. Never raises on a bad directory."""
        self._refresh()
        if not self._by_name and not self._by_ip:
            return None
        ip = parse_ip(host)
        candidates = self._by_ip.get(str(ip)) if ip is not None else self._by_name.get(normalise_name(host))
        if not candidates:
            return None
        now = time.monotonic()
        # Two runs of mesh on one service (different values): the newest mark wins.
        for entry in sorted(candidates, key=lambda e: e.mtime_ns, reverse=True):
            if port in entry.mark.ports and entry.name not in self._dead and self._alive(entry, now):
                if entry.name not in self._applied:
                    self._applied[entry.name] = m = entry.mark
                    log.info("auto-header: HTTP requests to %s.%s (ports %s) through this proxy now carry "
                             "'%s: %s' (ktctl mesh, pid %d)", m.service, m.namespace,
                             ",".join(map(str, m.ports)), m.key, m.value, m.pid)
                return entry.mark.header
        return None

    def _alive(self, entry: _Entry, now: float) -> bool:
        alive = pid_running(entry.mark.pid)
        if alive and now - entry.checked >= START_CHECK_INTERVAL:
            entry.checked = now
            alive = is_alive(entry.mark)
        if not alive:
            self._dead.add(entry.name)
            if self._applied.pop(entry.name, None) is not None:
                log.info("auto-header: ktctl mesh pid %d is gone; '%s: %s' is no longer added",
                         entry.mark.pid, entry.mark.key, entry.mark.value)
        return alive

    def _refresh(self) -> None:
        try:
            st = os.stat(self.directory)
        except OSError:
            stamp = None
        else:
            stamp = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if stamp == self._stamp and not self._racy:
            return
        started = time.time_ns()
        entries = self._load() if stamp is not None else []
        self._stamp = stamp
        self._racy = stamp is not None and stamp[2] >= started - RACY_NS
        self._by_name, self._by_ip = {}, {}
        for e in entries:
            for name in e.mark.names(self.namespace, self.domain):
                self._by_name.setdefault(name, []).append(e)
            if e.mark.cluster_ip:
                self._by_ip.setdefault(e.mark.cluster_ip, []).append(e)
        names = {e.name for e in entries}
        for gone in sorted(self._applied.keys() - names):
            m = self._applied.pop(gone)
            log.info("auto-header: ktctl mesh pid %d ended; '%s: %s' is no longer added", m.pid, m.key, m.value)
        self._dead &= names

    def _load(self) -> list[_Entry]:
        out: list[_Entry] = []
        uid = _uid()
        try:
            listing = list(os.scandir(self.directory))
        except OSError as exc:
            log.debug("mesh marks in %s unreadable: %s", self.directory, exc)
            return out
        for item in listing:
            if item.name.startswith(".") or not item.name.endswith(".json"):
                continue
            try:
                # Not through a symlink, and only this user's files: nobody else may add headers here.
                fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
                with os.fdopen(fd, "rb") as f:
                    st = os.fstat(f.fileno())
                    if (not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid)
                            or st.st_size > MAX_FILE):
                        continue
                    mark = Mark.from_json(f.read(MAX_FILE).decode("utf-8"))
            except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                log.debug("mesh mark %s ignored: %s", item.name, exc)
                continue
            out.append(_Entry(item.name, mark, st.st_mtime_ns))
        return out
