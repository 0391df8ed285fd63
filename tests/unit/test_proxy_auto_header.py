"""connect's proxy adds the mesh header of `ktctl mesh --auto-header` (issue 10 item 6), on loopback:
a real curl through the proxy, an origin that answers with the request head it received, and a dialer
that sends every name to that origin (as the tunnel sends `tomcat` to the service).

Only absolute-URI HTTP gets the header; CONNECT tunnels and SOCKS streams are bytes the proxy passes on.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ktproxy.mesh.marks import MeshMarks, publish, withdraw
from ktproxy.proxy.server import ProxyServer

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


class EchoOrigin:
    """Answers every request with its head as the body (keep-alive), and records the heads."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                self.heads.append(head)
                body = head.encode("latin-1")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> asyncio.AbstractServer:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server


class ToOrigin:
    """Every host:port goes to the echo origin; the names it was asked for are kept."""

    def __init__(self, origin: EchoOrigin) -> None:
        self.origin = origin
        self.asked: list[tuple[str, int]] = []

    async def dial(self, host: str, port: int) -> tuple[Any, Any]:
        self.asked.append((host, port))
        return await asyncio.open_connection("127.0.0.1", self.origin.port)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[ProxyServer, EchoOrigin, Path]]:
    origin = EchoOrigin()
    origin_server = await origin.start()
    marks_dir = tmp_path / "mesh-marks"
    proxy = ProxyServer(ToOrigin(origin), marks=MeshMarks("default", "cluster.local", marks_dir))  # type: ignore[arg-type]
    await proxy.start("127.0.0.1", 0)
    yield proxy, origin, marks_dir
    await proxy.close()
    origin_server.close()


async def curl(proxy: ProxyServer, *args: str, scheme: str = "http") -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--noproxy", "", "-x", f"{scheme}://127.0.0.1:{proxy.bound_port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode("latin-1")


def header_lines(head: str, name: str) -> list[str]:
    return [line for line in head.split("\r\n") if line.lower().startswith(name.lower() + ":")]


async def test_curl_to_a_meshed_service_carries_the_developers_header(setup: Any) -> None:
    proxy, _origin, marks_dir = setup
    publish("default", "tomcat", "10.96.5.5", [8080], "version", "abcde", directory=marks_dir)
    for url in ("http://tomcat:8080/", "http://tomcat.default.svc.cluster.local:8080/x?y=1", "http://10.96.5.5:8080/"):
        head = await curl(proxy, url)
        assert header_lines(head, "version") == ["version: abcde"], (url, head)


async def test_other_names_ports_and_namespaces_get_no_header(setup: Any) -> None:
    proxy, _origin, marks_dir = setup
    publish("default", "tomcat", "10.96.5.5", [8080], "version", "abcde", directory=marks_dir)
    for url in ("http://other:8080/", "http://tomcat:9090/", "http://tomcat.team-b:8080/"):
        assert header_lines(await curl(proxy, url), "version") == [], url


async def test_the_clients_own_header_is_kept(setup: Any) -> None:
    proxy, _origin, marks_dir = setup
    publish("default", "tomcat", None, [8080], "version", "abcde", directory=marks_dir)
    head = await curl(proxy, "-H", "VERSION: mine", "http://tomcat:8080/")
    assert header_lines(head, "version") == ["VERSION: mine"], head
    head = await curl(proxy, "-H", "Version;", "http://tomcat:8080/")  # curl's way to send an empty value
    assert header_lines(head, "version") == ["Version: "], head


async def test_one_kept_alive_client_connection_gets_the_header_per_request(setup: Any) -> None:
    proxy, origin, marks_dir = setup
    publish("default", "tomcat", None, [8080], "version", "abcde", directory=marks_dir)
    out = await curl(proxy, "http://tomcat:8080/1", "http://other:8080/2", "http://tomcat:8080/3")
    assert [len(header_lines(h, "version")) for h in origin.heads] == [1, 0, 1], origin.heads
    assert out.count("version: abcde") == 2


async def test_withdrawn_mark_no_longer_applies(setup: Any) -> None:
    proxy, _origin, marks_dir = setup
    path = publish("default", "tomcat", None, [8080], "version", "abcde", directory=marks_dir)
    assert header_lines(await curl(proxy, "http://tomcat:8080/"), "version") == ["version: abcde"]
    withdraw(path)
    assert header_lines(await curl(proxy, "http://tomcat:8080/"), "version") == []


@pytest.mark.parametrize("how", ["connect", "socks5h"])
async def test_tunnels_and_socks_are_left_alone(setup: Any, how: str) -> None:
    """Documented scope: the proxy only edits requests it parses (absolute-URI HTTP)."""
    proxy, _origin, marks_dir = setup
    publish("default", "tomcat", None, [8080], "version", "abcde", directory=marks_dir)
    if how == "connect":
        head = await curl(proxy, "--proxytunnel", "http://tomcat:8080/")
    else:
        head = await curl(proxy, "http://tomcat:8080/", scheme="socks5h")
    assert header_lines(head, "version") == [], head
    assert proxy.dialer.asked == [("tomcat", 8080)]


async def test_without_marks_nothing_is_added(tmp_path: Path) -> None:
    origin = EchoOrigin()
    origin_server = await origin.start()
    publish("default", "tomcat", None, [8080], "version", "abcde", directory=tmp_path)
    proxy = ProxyServer(ToOrigin(origin))  # type: ignore[arg-type]
    await proxy.start("127.0.0.1", 0)
    try:
        assert header_lines(await curl(proxy, "http://tomcat:8080/"), "version") == []
    finally:
        await proxy.close()
        origin_server.close()
