"""How tools are pointed at the proxy: environment lines to paste, or one command run with them set."""

from __future__ import annotations

import os
import sys

from ktproxy.routing import ClusterRules


def proxy_env(proxy_host: str, proxy_port: int, rules: ClusterRules) -> dict[str, str]:
    http_url = f"http://{proxy_host}:{proxy_port}"
    socks_url = f"socks5h://{proxy_host}:{proxy_port}"
    # NO_PROXY keeps loopback local; everything else reaches the proxy, which itself decides
    # between the tunnel and DIRECT, so the env stays short and correct for every tool.
    no_proxy = "localhost,127.0.0.1,::1"
    env = {"HTTP_PROXY": http_url, "HTTPS_PROXY": http_url, "ALL_PROXY": socks_url, "NO_PROXY": no_proxy}
    env.update({k.lower(): v for k, v in env.items()})
    return env


def export_lines(env: dict[str, str]) -> list[str]:
    keys = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]
    if sys.platform == "win32":
        return [f'$env:{k}="{env[k]}"' for k in keys]
    return [f"export {k}={env[k]}" for k in keys]


async def run_with_env(command: list[str], env: dict[str, str]) -> int:
    """Run `command` with the proxy env; its exit status becomes ours."""
    import asyncio

    full = {**os.environ, **env}
    try:
        proc = await asyncio.create_subprocess_exec(*command, env=full)
    except FileNotFoundError:
        from ktproxy.errors import KtError
        raise KtError(f"command not found: {command[0]}") from None
    try:
        return await proc.wait()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()

