"""How tools are pointed at the proxy: environment lines to paste, or one command run with them set."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from urllib.parse import quote

from ktproxy.routing import normalise_name, parse_ip

KEYS = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]


def reachable_host(bind_host: str) -> str:
    """Where clients connect for a given bind address. A wildcard bind (0.0.0.0, ::, [::], 0:0::0, or
    empty) is reached on the loopback of its family: a wildcard is not a destination every platform
    accepts. Anything else, loopback included, is reached where it is bound."""
    if not normalise_name(bind_host):
        return "127.0.0.1"
    ip = parse_ip(bind_host)
    if ip is not None and ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return normalise_name(bind_host) if ip is not None else bind_host


def proxy_env(
    proxy_host: str,
    proxy_port: int,
    credentials: tuple[str, str] | None = None,
    direct_hosts: Sequence[str] = (),
) -> dict[str, str]:
    """The proxy variables; `direct_hosts` (the API server) join NO_PROXY so a shell that pasted them
    still reaches the cluster's API after connect has stopped, as kubectl and ktctl itself must."""
    host = reachable_host(proxy_host)
    hostport = f"[{host}]:{proxy_port}" if ":" in host else f"{host}:{proxy_port}"
    if credentials is not None:
        user, password = credentials
        hostport = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    http_url = f"http://{hostport}"
    socks_url = f"socks5h://{hostport}"
    # NO_PROXY keeps loopback local; everything else reaches the proxy, which itself decides
    # between the tunnel and DIRECT, so the env stays short and correct for every tool.
    no_proxy = ",".join(dict.fromkeys(["localhost", "127.0.0.1", "::1", *(h for h in direct_hosts if h)]))
    env = {"HTTP_PROXY": http_url, "HTTPS_PROXY": http_url, "ALL_PROXY": socks_url, "NO_PROXY": no_proxy}
    env.update({k.lower(): v for k, v in env.items()})
    return env


def export_lines(env: dict[str, str]) -> list[str]:
    if sys.platform == "win32":  # PowerShell; Windows environment names ignore case
        return ["$env:{}=\"{}\"".format(k, env[k].replace("`", "``").replace('"', '`"').replace("$", "`$"))
                for k in KEYS]
    # Both spellings: curl reads http_proxy only in lower case, wget only lower case at all.
    return [f"export {name}={shlex.quote(env[k])}" for k in KEYS for name in (k, k.lower())]


async def run_with_env(command: list[str], env: dict[str, str]) -> int:
    """Run `command` with the proxy env; its exit status becomes ours (128+N when killed by signal N,
    as a shell reports it)."""
    import asyncio

    from ktproxy.errors import KtError

    full = {**os.environ, **env}
    try:
        proc = await asyncio.create_subprocess_exec(*command, env=full)
    except FileNotFoundError:
        raise KtError(f"command not found: {command[0]}") from None
    except OSError as exc:
        raise KtError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    try:
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return 128 - code if code < 0 else code  # negative only on POSIX: killed by signal -code
