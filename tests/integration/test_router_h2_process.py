"""HTTP/2 through the real router program (`python -m shadow_image.router`, its sniffing and hand-over to
H2Downstream) on loopback: curl --http2-prior-knowledge and the h2 test client, with and without the
route header, against h2c upstreams (h2_support.py) that say which route answered."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from h2_support import H2Client, H2Upstream, common_port
from test_router_support import RouterProcess

STUNTMAN, ABCDE = "127.0.0.1", "127.0.0.2"  # RouterProcess sends the original pods' traffic to 127.0.0.1


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[RouterProcess]:
    port = common_port([STUNTMAN, ABCDE])
    ups = [await H2Upstream("stuntman").start(STUNTMAN, port), await H2Upstream("abcde").start(ABCDE, port)]
    proc = RouterProcess(SimpleNamespace(port=port), tmp_path, "version:abcde", route_host=ABCDE)  # type: ignore[arg-type]
    await asyncio.to_thread(proc.start)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)
        for up in ups:
            await up.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_h2c_through_the_router_program(routed: RouterProcess) -> None:
    for header, route in ((None, "stuntman"), ("Version: abcde", "abcde"), ("version: other", "stuntman")):
        args = ["curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "-w", "\n%{http_version}"]
        if header:
            args += ["-H", header]
        proc = await asyncio.create_subprocess_exec(*args, f"http://127.0.0.1:{routed.port}/p",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        body, version = out.decode().rsplit("\n", 1)
        assert version == "2"
        assert json.loads(body)["route"] == route, header


async def test_multiplexed_streams_through_the_router_program(routed: RouterProcess) -> None:
    client = await H2Client.connect("127.0.0.1", routed.port)
    plan = [[], [("version", "abcde")]] * 20
    replies = await asyncio.gather(*(client.request(f"/{i}", headers=h) for i, h in enumerate(plan)))
    assert [r.json()["route"] for r in replies] == ["stuntman", "abcde"] * 20
    client.close()
