"""Readiness: 200 only when every exposed port listens and has a laptop attached; the probe endpoint."""

from __future__ import annotations

import asyncio

import pytest

from shadow_image.health import answer, readiness, serve_health
from shadow_image.ports import PortState


def test_without_expose_ready_means_listening() -> None:
    assert readiness(True, []) == (True, "listening")
    assert readiness(False, []) == (False, "the SSH server is not listening")


def test_every_exposed_port_needs_its_listener_and_a_laptop() -> None:
    both = [PortState(8080, True, 1), PortState(9090, True, 2)]
    assert readiness(True, both) == (True, "laptop attached for port(s) 8080,9090")
    assert readiness(True, [PortState(8080, True, 1), PortState(9090, True, 0)]) == (
        False, "no laptop attached for port(s) 9090")
    assert readiness(True, [PortState(8080, False, 1), PortState(9090, True, 0)]) == (
        False, "not listening on port(s) 8080")
    assert readiness(False, both)[0] is False


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/live", 200), ("HEAD", "/ready", 503), ("GET", "/ready?x=1", 503), ("GET", "/", 404),
    ("POST", "/ready", 405),
])
def test_answers(method: str, path: str, status: int) -> None:
    assert answer(method, path, lambda: (False, "no laptop attached for port(s) 80"))[0] == status


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    return data


async def test_endpoint_answers_probes_with_the_current_state() -> None:
    state = [(False, "no laptop attached for port(s) 8080")]
    health = await serve_health(0, lambda: state[0])
    try:
        req = b"GET /ready HTTP/1.1\r\nHost: 10.0.0.7:8081\r\nUser-Agent: kube-probe/1.34\r\n\r\n"
        first = await _get(health.port, req)
        assert first.startswith(b"HTTP/1.1 503 ") and first.endswith(b"\r\n\r\nno laptop attached for port(s) 8080\n")
        state[0] = (True, "laptop attached for port(s) 8080")
        assert (await _get(health.port, req)).startswith(b"HTTP/1.1 200 OK\r\n")
        assert (await _get(health.port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    finally:
        health.close()
        await health.wait_closed()
