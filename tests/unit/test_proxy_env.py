"""The proxy environment: the lines `ktctl connect` prints, and `ktctl connect -- CMD` running one command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from ktproxy.errors import KtError
from ktproxy.proxy_env import export_lines, proxy_env, reachable_host, run_with_env


def test_env_values():
    env = proxy_env("127.0.0.1", 2223)
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:2223"
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:2223"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:2223"  # names resolved remotely
    no_proxy = env["NO_PROXY"].split(",")
    assert env["no_proxy"] == env["NO_PROXY"]
    assert {"localhost", "127.0.0.1", "::1"} <= set(no_proxy)


def test_direct_hosts_join_no_proxy_once():
    env = proxy_env("127.0.0.1", 2223, direct_hosts=("172.31.255.1", "127.0.0.1", ""))
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1,172.31.255.1"


def test_env_ipv6_proxy_host_is_bracketed():
    env = proxy_env("::1", 2223)
    assert env["HTTP_PROXY"] == "http://[::1]:2223"
    assert env["ALL_PROXY"] == "socks5h://[::1]:2223"


@pytest.mark.parametrize("bind,expected", [("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("", "127.0.0.1"),
                                           ("[::]", "[::1]"), ("0:0::0", "[::1]")])
def test_env_wildcard_bind_points_tools_at_loopback(bind, expected):
    # A listener on 0.0.0.0 is reachable at loopback; 0.0.0.0 itself is not a destination everywhere.
    # Decided by parsing the address, as routing does, so every spelling of the wildcard counts.
    assert proxy_env(bind, 2223)["HTTP_PROXY"] == f"http://{expected}:2223"


@pytest.mark.parametrize("bind", ["127.0.0.2", "::1", "[::1]", "localhost", "192.0.2.1", "127.lan.example.com"])
def test_reachable_host_is_the_bind_address_itself(bind):
    assert reachable_host(bind) == bind.strip("[]")


def test_env_with_credentials():
    env = proxy_env("192.0.2.1", 2223, credentials=("al ice", "p@ss:w/rd"))
    assert env["HTTP_PROXY"] == "http://al%20ice:p%40ss%3Aw%2Frd@192.0.2.1:2223"
    assert env["ALL_PROXY"] == "socks5h://al%20ice:p%40ss%3Aw%2Frd@192.0.2.1:2223"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell lines")
def test_export_lines_posix():
    lines = export_lines(proxy_env("127.0.0.1", 2223))
    assert "export HTTP_PROXY=http://127.0.0.1:2223" in lines
    assert "export ALL_PROXY=socks5h://127.0.0.1:2223" in lines
    # curl reads http_proxy only in lower case, wget reads only lower case: both spellings are printed
    assert "export http_proxy=http://127.0.0.1:2223" in lines
    assert "export https_proxy=http://127.0.0.1:2223" in lines
    assert any(line.startswith("export NO_PROXY=localhost,") for line in lines)
    assert any(line.startswith("export no_proxy=") for line in lines)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell lines")
def test_export_lines_are_valid_shell():
    env = proxy_env("127.0.0.1", 2223, credentials=("u", "p$`x'\"y"))
    script = "\n".join(export_lines(env)) + '\nprintf "%s\\n" "$HTTP_PROXY" "$no_proxy"'
    out = os.popen(f"sh -c {_sq(script)}").read().splitlines()
    assert out == [env["HTTP_PROXY"], env["no_proxy"]]


def _sq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def test_export_lines_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    lines = export_lines(proxy_env("127.0.0.1", 2223))
    assert '$env:HTTP_PROXY="http://127.0.0.1:2223"' in lines
    assert '$env:ALL_PROXY="socks5h://127.0.0.1:2223"' in lines


# -- ktctl connect -- CMD ------------------------------------------------------------------------
PY = sys.executable


async def test_run_with_env_exit_status():
    assert await run_with_env([PY, "-c", "raise SystemExit(0)"], {}) == 0
    assert await run_with_env([PY, "-c", "raise SystemExit(7)"], {}) == 7
    assert await run_with_env([PY, "-c", "raise SystemExit(255)"], {}) == 255


async def test_run_with_env_sets_the_env(tmp_path):
    out = tmp_path / "env.txt"
    env = proxy_env("127.0.0.1", 2223)
    code = ("import os, sys; open(sys.argv[1], 'w').write("
            "os.environ['ALL_PROXY'] + ' ' + os.environ['http_proxy'] + ' ' + os.environ['PATH'])")
    assert await run_with_env([PY, "-c", code, str(out)], env) == 0
    all_proxy, http_proxy, path = out.read_text().split(" ", 2)
    assert (all_proxy, http_proxy) == ("socks5h://127.0.0.1:2223", "http://127.0.0.1:2223")
    assert path == os.environ["PATH"]  # the rest of the user's environment is kept


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_run_with_env_killed_by_signal_is_128_plus_signal():
    # What a shell reports for a command killed by SIGTERM: 143, not Python's -15 (exit 241).
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert await run_with_env([PY, "-c", code], {}) == 128 + signal.SIGTERM


async def test_run_with_env_missing_command():
    with pytest.raises(KtError, match="command not found"):
        await run_with_env(["ktproxy-no-such-command-xyz"], {})


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
async def test_run_with_env_not_executable(tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(KtError):
        await run_with_env([str(script)], {})


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_run_with_env_cancel_stops_the_child(tmp_path):
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    task = asyncio.ensure_future(run_with_env([PY, "-c", code], {}))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.05)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped
