"""The router's HTTP/2 layer on loopback with real clients (curl --http2-prior-knowledge, an h2 client,
grpcio when installed) and h2c upstreams that say which route answered (h2_support.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from h2.errors import ErrorCodes
from h2_support import H2Client, H2Upstream, LoopbackTable, common_port, pattern, router, until, wait_reply

from shadow_image.router import h2_conn
from shadow_image.router.h2_upstream import pool_for

ROUTER, STUNTMAN, ABCDE, FGHIJ, DEAD = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"


@dataclass
class Mesh:
    port: int  # the router listens on ROUTER:port, upstreams on their own address, same port
    stuntman: H2Upstream
    abcde: H2Upstream
    fghij: H2Upstream
    table: LoopbackTable

    async def client(self, **kw: int) -> H2Client:
        return await H2Client.connect(ROUTER, self.port, **kw)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    port = common_port([ROUTER, STUNTMAN, ABCDE, FGHIJ, DEAD])
    table = LoopbackTable(port, port, STUNTMAN, {"abcde": ABCDE, "fghij": FGHIJ, "deadd": DEAD})
    table.set_routes([("version", "abcde"), ("version", "fghij"), ("version", "deadd")])
    ups = [await H2Upstream(name).start(host, port)
           for name, host in (("stuntman", STUNTMAN), ("abcde", ABCDE), ("fghij", FGHIJ))]
    async with router(table, ROUTER, port):
        yield Mesh(port, *ups, table)
    for up in ups:
        await up.stop()


async def curl(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_prior_knowledge_with_and_without_the_header(mesh: Mesh) -> None:
    url = f"http://{ROUTER}:{mesh.port}/hello"
    rc, out = await curl(url)
    assert rc == 0, out
    body, status = out.rsplit("\n", 1)
    assert status == "2 200"
    seen = json.loads(body)
    # Non-matching traffic stays HTTP/2 all the way (the upstreams speak nothing else).
    assert seen["route"] == "stuntman"
    assert seen["authority"] == f"{ROUTER}:{mesh.port}"
    assert seen["xff"] == "127.0.0.1"

    rc, out = await curl("-H", "VERSION: abcde", "-H", "X-Forwarded-For: 10.9.8.7", url)
    assert rc == 0, out
    body, status = out.rsplit("\n", 1)
    seen = json.loads(body)
    assert (status, seen["route"], seen["version"]) == ("2 200", "abcde", "abcde")
    assert seen["xff"] == "10.9.8.7, 127.0.0.1"
    assert seen["authority"] == f"{ROUTER}:{mesh.port}"

    # An unknown value and a different header name both go to the original pods.
    for header in ("version: zzzzz", "release: abcde"):
        rc, out = await curl("-H", header, url)
        assert json.loads(out.rsplit("\n", 1)[0])["route"] == "stuntman", header


async def test_streams_on_one_connection_alternate_routes(mesh: Mesh) -> None:
    client = await mesh.client()
    plan = [[], [("version", "abcde")], [("Version", "fghij")], [("version", "nope1")]] * 12
    replies = await asyncio.gather(*(client.request(f"/s{i}", headers=h) for i, h in enumerate(plan)))
    want = {"abcde": "abcde", "fghij": "fghij"}
    for i, (headers, reply) in enumerate(zip(plan, replies, strict=True)):
        assert reply.status == 200, reply
        expected = want.get(headers[0][1], "stuntman") if headers else "stuntman"
        assert reply.json()["route"] == expected
        assert reply.json()["path"] == f"/s{i}"
    # Upstream connections are reused by every stream, and by the next client connection.
    other = await mesh.client()
    reply = await other.request("/again", headers=[("version", "abcde")])
    assert reply.json()["route"] == "abcde"
    assert (mesh.stuntman.accepted, mesh.abcde.accepted, mesh.fghij.accepted) == (1, 1, 1)
    client.close()
    other.close()


async def test_large_upload_and_download(mesh: Mesh) -> None:
    client = await mesh.client()
    data = pattern(24 << 20, seed=3)
    up, down = await asyncio.gather(
        client.request("/upload", method="POST", headers=[("version", "abcde")], body=data),
        client.request(f"/big?n={24 << 20}", headers=[("version", "fghij")]))
    assert up.status == 200
    assert up.json()["body_len"] == len(data)
    assert up.json()["body_sha"] == hashlib.sha256(data).hexdigest()
    assert down.status == 200 and down.headers[b"x-route"] == b"fghij"
    assert len(down.body) == 24 << 20
    assert down.body == pattern(24 << 20)
    client.close()


async def test_a_client_that_does_not_read_holds_back_the_upstream(mesh: Mesh) -> None:
    """Nothing buffers a whole body: while the client acknowledges nothing, the upstream can send no
    more than the router's stream window plus the client's window."""
    client = await mesh.client(window=65535)
    client.read = False
    total = 32 << 20
    _, fut = client.start(f"/big?n={total}", headers=[("version", "abcde")])
    last, still = -1, 0
    for _ in range(400):  # until the upstream's progress stops moving (at most ~20 s)
        await asyncio.sleep(0.05)
        now = mesh.abcde.progress[0]
        still = still + 1 if now == last else 0
        last = now
        if still >= 6 and now > 0:
            break
    assert 0 < mesh.abcde.progress[0] <= h2_conn.STREAM_WINDOW + 65535 + h2_conn.MAX_FRAME
    client.resume_reading()
    reply = await wait_reply(fut)
    assert reply.body == pattern(total)
    client.close()


async def test_trailers_pass_both_ways(mesh: Mesh) -> None:
    client = await mesh.client()
    reply = await client.request("/trailers", method="POST", headers=[("version", "abcde"), ("te", "trailers")],
                                 body=b"\0\0\0\0\x05hello", trailers=[(b"grpc-timeout", b"5S")])
    assert reply.status == 200
    assert reply.trailers == {b"grpc-status": b"0", b"grpc-message": b"ok"}
    assert reply.json()["trailers"] == {"grpc-timeout": "5S"}
    assert reply.json()["body_len"] == 10
    client.close()


async def test_upstream_reset_reaches_the_client_alone(mesh: Mesh) -> None:
    client = await mesh.client()
    reset, fine = await asyncio.gather(client.request("/rst", headers=[("version", "abcde")]),
                                       client.request("/ok", headers=[("version", "abcde")]))
    assert reset.reset == ErrorCodes.ENHANCE_YOUR_CALM
    assert fine.status == 200 and fine.json()["route"] == "abcde"
    assert (await client.request("/after", headers=[("version", "abcde")])).status == 200
    client.close()


async def test_client_reset_reaches_the_upstream(mesh: Mesh) -> None:
    client = await mesh.client(window=65535)
    client.read = False
    sid, _ = client.start("/big?n=8000000", headers=[("version", "fghij")])
    await until(lambda: mesh.fghij.progress[0] > 0, "the upstream to start sending")
    client.conn.reset_stream(sid, ErrorCodes.CANCEL)
    client.flush()
    await until(lambda: mesh.fghij.resets, "the reset to reach the upstream")
    assert mesh.fghij.resets == [ErrorCodes.CANCEL]
    client.resume_reading()
    assert (await client.request("/next", headers=[("version", "fghij")])).json()["route"] == "fghij"
    client.close()


async def test_early_answer_then_reset_no_error(mesh: Mesh) -> None:
    """The upstream answers before the request body ends and refuses the rest (RST_STREAM NO_ERROR):
    the client gets the whole answer, then the reset."""
    client = await mesh.client()
    sid, fut = client.start("/early", method="POST", headers=[("version", "abcde")])
    client.conn.send_data(sid, b"x" * 1000)
    client.flush()
    reply = await wait_reply(fut)
    assert reply.status == 200 and reply.json()["route"] == "abcde"
    assert (await client.request("/ok")).status == 200
    client.close()


async def test_dead_route_answers_502_naming_it(mesh: Mesh) -> None:
    client = await mesh.client()
    dead, alive = await asyncio.gather(
        client.request("/x", method="POST", headers=[("version", "deadd")], body=b"y" * 100000),
        client.request("/y", headers=[("version", "abcde")]))
    assert dead.status == 502
    assert b"route 'VERSION: deadd' (svc-kt-mesh-deadd:" in dead.body
    assert alive.status == 200
    assert (await client.request("/z")).json()["route"] == "stuntman"
    client.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_dead_route_502_with_curl(mesh: Mesh) -> None:
    rc, out = await curl("-H", "version: deadd", f"http://{ROUTER}:{mesh.port}/")
    assert rc == 0, out
    assert out.endswith("\n2 502")
    assert "route 'VERSION: deadd'" in out


async def test_upstream_goaway_finishes_its_streams_and_a_new_connection_follows(mesh: Mesh) -> None:
    client = await mesh.client()
    reply = await client.request("/goaway", headers=[("version", "abcde")])
    assert reply.status == 200 and reply.json()["route"] == "abcde"
    again = await client.request("/after", headers=[("version", "abcde")])
    assert again.status == 200 and again.json()["route"] == "abcde"
    assert mesh.abcde.accepted == 2
    client.close()


async def test_client_gone_leaves_shared_upstream_connections_working(mesh: Mesh) -> None:
    first, second = await mesh.client(window=65535), await mesh.client()
    first.read = False
    first.start("/big?n=4000000", headers=[("version", "abcde")])
    await until(lambda: mesh.abcde.progress[0] > 0, "the upstream to start sending")
    # A GOAWAY with an error, then the connection goes: its stream is cancelled upstream.
    first.send_goaway(0, ErrorCodes.INTERNAL_ERROR)
    first.close()
    await until(lambda: mesh.abcde.resets, "the reset to reach the upstream")
    assert mesh.abcde.resets == [ErrorCodes.CANCEL]
    assert (await second.request("/still", headers=[("version", "abcde")])).json()["route"] == "abcde"
    assert mesh.abcde.accepted == 1
    second.close()


async def test_client_goaway_without_error_lets_its_streams_finish(mesh: Mesh) -> None:
    client = await mesh.client()
    _, fut = client.start("/big?n=3000000", headers=[("version", "abcde")])
    client.send_goaway(0)
    reply = await wait_reply(fut)
    assert reply.body == pattern(3000000)
    client.close()


async def test_upstream_dies_mid_stream(mesh: Mesh) -> None:
    client = await mesh.client(window=65535)
    client.read = False
    _, fut = client.start("/big?n=8000000", headers=[("version", "fghij")])
    await until(lambda: mesh.fghij.progress[0] > 0, "the upstream to start sending")
    await mesh.fghij.stop()
    reply = await wait_reply(fut)
    assert reply.reset == ErrorCodes.INTERNAL_ERROR
    assert pool_for(asyncio.get_running_loop()).connections(mesh.table.for_route("version", "fghij", mesh.port)) == []
    client.close()


async def test_kept_alive_upstream_closed_under_a_request(mesh: Mesh) -> None:
    """A GET whose upstream connection closes before any answer is sent again on a new connection; a
    POST (perhaps processed already) is not: 502."""
    client = await mesh.client()
    assert (await client.request("/warm", headers=[("version", "abcde")])).status == 200
    reply = await client.request("/drop-once", headers=[("version", "abcde")])
    assert reply.status == 200 and reply.json()["path"] == "/drop-once"
    assert mesh.abcde.accepted == 2
    mesh.fghij.dropped = False
    post = await client.request("/drop-once", method="POST", headers=[("version", "fghij")], body=b"once")
    assert post.status == 502 and b"the connection closed before a response" in post.body
    client.close()


async def test_a_malformed_request_resets_its_stream_alone_on_a_real_connection(mesh: Mesh) -> None:
    """RFC 9113 8.1.1: a stream error; the streams beside it (sent in the same write) are answered."""
    client = await mesh.client()
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    flush, client.flush = client.flush, lambda: None  # type: ignore[method-assign]  # one write for all three
    _, good = client.start("/a", headers=[("version", "abcde")])
    _, bad = client.start("/b", headers=[("version", " abcde")])
    _, upper = client.start("/c", headers=[("Version", "abcde")])
    _, other = client.start("/d")
    client.flush = flush  # type: ignore[method-assign]
    client.flush()
    replies = [await wait_reply(f) for f in (good, bad, upper, other)]
    assert [(r.status, r.reset) for r in replies] == [(200, None), (0, ErrorCodes.PROTOCOL_ERROR),
                                                      (0, ErrorCodes.PROTOCOL_ERROR), (200, None)]
    assert replies[0].json()["route"] == "abcde" and replies[3].json()["route"] == "stuntman"
    assert (await client.request("/after", headers=[("version", "fghij")])).json()["route"] == "fghij"
    client.close()


async def test_a_connection_error_ends_with_goaway_and_a_half_close_not_a_reset(mesh: Mesh) -> None:
    """The router used to close at once: the client's next bytes drew a TCP reset, which can destroy the
    GOAWAY before it is read."""
    reader, writer = await asyncio.open_connection(ROUTER, mesh.port)
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    zero_window_update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + zero_window_update)
    data = await asyncio.wait_for(reader.read(), 10)  # up to the router's FIN, no reset
    frames = []
    while len(data) >= 9:
        n = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9:9 + n]))
        data = data[9 + n:]
    goaways = [payload for kind, payload in frames if kind == 7]
    assert [int.from_bytes(g[4:8], "big") for g in goaways] == [ErrorCodes.PROTOCOL_ERROR]
    # The client still sending meanwhile is read and dropped, not answered with a reset.
    for _ in range(3):
        writer.write(b"\x00" * 65536)
        await writer.drain()
        await asyncio.sleep(0.1)
    writer.close()
