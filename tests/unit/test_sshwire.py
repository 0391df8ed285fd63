"""The asyncssh wire patches in ktwire/sshwire.py, on a real client/server pair over loopback.

A relay between the two ends re-chops the byte stream at random boundaries, merging and splitting SSH
packets, so the packet-at-a-time feeder meets every split it can meet in the wild: mid-header,
mid-MAC, several packets in one read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from asyncssh import connection, packet
from asyncssh.crypto import cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ktproxy.tunnel.session import SSHOptions, connect_tcp
from ktwire import sshwire
from shadow_image import sshd


@pytest.fixture(autouse=True, scope="module")
def _wire_patches() -> None:
    sshwire.install()  # what ktctl's and the shadow's entry points do


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _chop(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rng: random.Random) -> None:
    """Forward in random pieces: tiny ones (split headers and MACs) and merged big ones."""
    pending = b""
    while True:
        try:
            # Held bytes go out once the sender pauses: a handshake step must never wait on them.
            data = await asyncio.wait_for(src.read(rng.choice([7, 100, 4096, 65536, 300_000])),
                                          0.005 if pending else None)
        except TimeoutError:
            dst.write(pending)
            pending = b""
            await dst.drain()
            continue
        if not data:
            break
        pending += data
        while len(pending) > rng.choice([0, 1, 17, 5000, 200_000]):
            cut = rng.randint(1, len(pending))
            dst.write(pending[:cut])
            pending = pending[cut:]
            await dst.drain()
            if rng.random() < 0.3:
                await asyncio.sleep(0)
    dst.write(pending)
    await dst.drain()
    dst.close()


@pytest.fixture
async def chopped_tunnel(tmp_path):
    """A shadow server, a chopping relay in front of it, and a loopback echo target behind it."""
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(client_key.export_public_key())
    host_key.write_private_key(str(tmp_path / "host_key"))
    acceptor = await sshd.serve("127.0.0.1", 0, str(tmp_path / "authorized_keys"), str(tmp_path / "host_key"))
    ssh_port = acceptor.sockets[0].getsockname()[1]
    rng = random.Random(1234)

    async def relay(reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", ssh_port)
        await asyncio.gather(_chop(reader, up_w, rng), _chop(up_r, writer, rng), return_exceptions=True)

    relay_srv = await asyncio.start_server(relay, "127.0.0.1", 0)
    echo_srv = await asyncio.start_server(_echo, "127.0.0.1", 0)
    opts = SSHOptions(client_key, host_key.convert_to_public())
    conn = await connect_tcp("127.0.0.1", relay_srv.sockets[0].getsockname()[1], opts)
    yield conn, echo_srv.sockets[0].getsockname()[1]
    conn.close()
    await conn.wait_closed()
    for srv in (relay_srv, echo_srv):
        srv.close()
    acceptor.close()


def test_importing_either_end_patches_nothing_until_install():
    # Patching asyncssh is an entry point's explicit choice, never a side effect of an import.
    code = ("import sys\n"
            "import ktproxy.tunnel.session, ktproxy.cli, shadow_image.sshd\n"
            "from ktwire import sshwire\n"
            "assert not any(sshwire.installed().values()), sshwire.installed()\n"
            "everything = dict.fromkeys(sshwire.PATCHES, True)\n"
            "assert sshwire.install() == everything\n"
            "assert sshwire.installed() == everything, sshwire.installed()\n"
            "assert sshwire.install() == everything\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pinned_asyncssh_is_the_locked_one():
    # The per-packet patches apply only to the asyncssh they were written against.
    lock = (Path(__file__).parents[2] / "requirements.lock").read_text()
    assert f"asyncssh=={sshwire.ASYNCSSH_PINNED}\n" in lock
    assert asyncssh.__version__ == sshwire.ASYNCSSH_PINNED


def test_other_asyncssh_release_keeps_its_own_behaviour(caplog):
    # Under another release every per-packet patch backs off, says why at debug level, and patches nothing.
    code = ("import logging, asyncssh\n"
            "logging.basicConfig(level=logging.DEBUG, format='%(message)s')\n"
            "asyncssh.__version__ = '9.9.9'\n"
            "from ktwire import sshwire\n"
            "result = sshwire.install()\n"
            "per_packet = set(sshwire.PATCHES) - {'drop_cbc_ignore_packets', 'feed_whole_packets'}\n"
            "assert per_packet and not any(result[n] for n in per_packet), result\n"
            "assert not any(sshwire.installed()[n] for n in per_packet), sshwire.installed()\n")
    r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "asyncssh 9.9.9 is not the pinned" in r.stderr


class _NoAuth(asyncssh.SSHServer):
    """A plain asyncssh server (no shadow, no auth) that records how each connection ended."""

    ended: asyncio.Queue

    def begin_auth(self, username: str) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended.put_nowait(exc)


@pytest.fixture
async def plain_pair():
    """A connected asyncssh client and server in this process (both patched), and how the server's ended."""
    ended: asyncio.Queue = asyncio.Queue()
    server_cls = type("Server", (_NoAuth,), {"ended": ended})
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key], server_factory=server_cls,
                                     encryption_algs=sshwire.CIPHERS[:1])
    port = acceptor.sockets[0].getsockname()[1]
    conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                  encryption_algs=sshwire.CIPHERS[:1])
    yield conn, ended
    conn.abort()
    acceptor.close()


class _CountingTransport:
    """The connection's transport, counting the calls that reach the socket."""

    def __init__(self, inner: asyncio.Transport) -> None:
        self.inner, self.calls = inner, 0

    def write(self, data: bytes) -> None:
        self.calls += 1
        self.inner.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls += 1
        self.inner.writelines(chunks)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


async def test_packets_of_one_turn_reach_the_socket_in_one_write(plain_pair):
    conn, ended = plain_pair
    counting = _CountingTransport(conn._transport)
    conn._transport = counting
    for n in range(50):  # all in one turn, as 50 channels answering in the same loop iteration would
        conn.send_packet(connection.MSG_IGNORE, connection.String(f"{n}".encode()))
    for _ in range(3):
        await asyncio.sleep(0)
    assert counting.calls == 1
    # The peer parsed all 50 in order (a wrong order breaks the AEAD sequence and ends the connection).
    # A round trip after them (the plain server refuses to forward) proves the peer is still in sync.
    with pytest.raises(asyncssh.ChannelOpenError):
        await asyncio.wait_for(conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 9), 10)
    assert ended.empty()
    calls = counting.calls
    # And one more packet a turn later is written on its own turn.
    conn.send_packet(connection.MSG_IGNORE, connection.String(b"x"))
    for _ in range(3):
        await asyncio.sleep(0)
    assert counting.calls == calls + 1


async def test_close_in_the_same_turn_still_sends_what_came_before_and_the_disconnect(plain_pair):
    conn, ended = plain_pair
    for n in range(20):
        conn.send_packet(connection.MSG_IGNORE, connection.String(f"{n}".encode()))
    conn.close()  # no await in between: the packets and the DISCONNECT wait in the same turn's list
    exc = await asyncio.wait_for(ended.get(), 10)
    # asyncssh reports a received DISCONNECT "by application" as None; a lost one as ConnectionLost.
    assert exc is None, exc


async def test_abort_with_packets_pending_closes_without_error(plain_pair):
    conn, ended = plain_pair
    conn.send_packet(connection.MSG_IGNORE, connection.String(b"x"))
    conn.abort()
    await asyncio.wait_for(conn.wait_closed(), 10)
    exc = await asyncio.wait_for(ended.get(), 10)
    assert exc is None or isinstance(exc, (asyncssh.ConnectionLost, ConnectionError)), exc


async def test_bulk_and_small_messages_survive_arbitrary_splits(chopped_tunnel, monkeypatch):
    conn, echo_port = chopped_tunnel
    # The parser must only ever hold one packet once authenticated: that is the whole point of the
    # feeder (asyncssh alone holds a whole read, up to 256 KB, and re-slices it after every packet).
    held = []
    recv_data = connection.SSHConnection._recv_data

    def spy(self):
        if self._auth_complete:
            held.append(len(self._inpbuf))
        return recv_data(self)

    monkeypatch.setattr(connection.SSHConnection, "_recv_data", spy)

    reader, writer = await conn.open_connection("127.0.0.1", echo_port)
    payload = random.Random(7).randbytes(6 * 1024 * 1024)
    sent = hashlib.sha256(payload).hexdigest()

    async def send() -> None:
        for i in range(0, len(payload), 50_000):
            writer.write(payload[i : i + 50_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.read(), 60)
    await sender
    assert len(got) == len(payload) and hashlib.sha256(got).hexdigest() == sent

    # Many tiny packets in flight at once: several land in one read and are parsed one by one.
    streams = [await conn.open_connection("127.0.0.1", echo_port) for _ in range(20)]
    for rnd in range(30):
        for n, (_, w) in enumerate(streams):
            w.write(f"{rnd}:{n};".encode())
        for n, (r, _) in enumerate(streams):
            assert await asyncio.wait_for(r.readexactly(len(f"{rnd}:{n};")), 10) == f"{rnd}:{n};".encode()
    for _, w in streams:
        w.close()

    assert held, "the receive path was never exercised"
    assert max(held) <= sshwire.MAX_PKTSIZE + sshwire._FEED_AT_LEAST + 1024


def test_unfamiliar_parser_state_is_fed_whole():
    """An asyncssh whose per-connection state is named differently gets whole reads, as it expects."""
    cls = connection.SSHConnection
    assert sshwire._bytes_needed(object(), cls._recv_pkthdr, cls._recv_packet) == 0


async def test_padding_comes_from_a_pool_not_a_syscall_per_packet(plain_pair, monkeypatch):
    conn, _ = plain_pair
    calls = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    for n in range(1000):
        conn.send_packet(connection.MSG_IGNORE, connection.String(f"{n}".encode()))
    await asyncio.sleep(0)
    assert len(calls) <= 1, f"{len(calls)} os.urandom calls for 1000 packets"
    with pytest.raises(asyncssh.ChannelOpenError):  # the peer is still in sync
        await asyncio.wait_for(conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 9), 10)


def test_pooled_random_bytes_are_never_handed_out_twice():
    pool = sshwire._PooledRandomOS()
    drawn = [pool.urandom(n) for n in range(4, 20) for _ in range(2000)]
    assert all(len(b) == n for b, n in zip(drawn, [n for n in range(4, 20) for _ in range(2000)], strict=True))
    joined = b"".join(drawn)
    assert len(joined) > 3 * sshwire._RANDOM_POOL  # several refills
    # Consecutive 16-byte windows of fresh randomness do not repeat (a reused pool slice would).
    windows = {joined[i:i + 16] for i in range(0, len(joined) - 15, 16)}
    assert len(windows) == len(joined) // 16
    assert len(pool.urandom(sshwire._RANDOM_POOL)) == sshwire._RANDOM_POOL  # big asks go straight to os
    assert pool.path is os.path and pool.environ is os.environ


def test_pool_is_forgotten_in_a_forked_child():
    pool = sshwire._PooledRandomOS()
    pool.urandom(8)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must draw fresh bytes, not the rest of the parent's pool
        os.write(w, pool.urandom(16))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 16)
    assert child != pool.urandom(16)


class _CountingAESGCM:
    """Stands in for the AESGCM class in asyncssh's cipher module, counting the objects made."""

    made = 0

    def __new__(cls, key: bytes) -> AESGCM:  # type: ignore[misc]
        cls.made += 1
        return AESGCM(key)


@pytest.fixture
def counting_aesgcm(monkeypatch):
    monkeypatch.setattr(cipher, "AESGCM", _CountingAESGCM)
    _CountingAESGCM.made = 0


async def test_one_aead_object_per_key_not_per_packet(counting_aesgcm, plain_pair):
    conn, _ = plain_pair  # made after counting_aesgcm: every key of this pair is counted
    for n in range(200):
        conn.send_packet(connection.MSG_IGNORE, connection.String(f"{n}".encode()))
    with pytest.raises(asyncssh.ChannelOpenError):  # a round trip: the peer decrypts them all in sequence
        await asyncio.wait_for(conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 9), 10)
    # Client and server here share the process: one object per key and direction, each side (4 keys).
    assert 0 < _CountingAESGCM.made <= 4, _CountingAESGCM.made


def _reference(key: bytes, iv: bytes, packets: list[bytes]) -> list[bytes]:
    """RFC 5647 by hand: fixed field + 64-bit invocation counter, +1 per packet, mod 2**64."""
    fixed, invocation, out = iv[:4], int.from_bytes(iv[4:], "big"), []
    for p in packets:
        nonce = fixed + invocation.to_bytes(8, "big")
        out.append(AESGCM(key).encrypt(nonce, p[4:], p[:4]))
        invocation = (invocation + 1) % 2**64
    return out


@pytest.mark.parametrize("start", [0, 2**64 - 2, 12345678901234])
def test_gcm_nonce_sequence_is_rfc5647s_including_the_wrap(start):
    key = bytes(range(16))
    iv = b"\xa1\xb2\xc3\xd4" + start.to_bytes(8, "big")
    packets = [bytes([n]) * (16 + n) for n in range(5)]
    enc, dec = cipher.GCMCipher("aes128-gcm", key, iv), cipher.GCMCipher("aes128-gcm", key, iv)
    for p, want in zip(packets, _reference(key, iv, packets), strict=True):
        header, body = p[:4], p[4:]
        ct, tag = enc.encrypt_and_sign(header, body)
        assert ct[:4] == header and ct[4:] + tag == want
        assert dec.verify_and_decrypt(header, ct[4:], tag) == body
    assert enc._iv == dec._iv == iv[:4] + ((start + 5) % 2**64).to_bytes(8, "big")
    assert dec.verify_and_decrypt(b"\0" * 4, b"x" * 16, b"\0" * 16) is None  # a bad tag still fails


def test_gcm_matches_asyncssh_own_class_packet_for_packet(monkeypatch):
    key, iv = bytes(range(32)), bytes(range(12))
    ours = cipher.GCMCipher("aes256-gcm", key, iv)
    packets = [bytes([n]) * (4 + 16 * n) for n in range(1, 8)]
    theirs = [ours.encrypt_and_sign(p[:4], p[4:]) for p in packets]
    monkeypatch.setattr(cipher.GCMCipher, "encrypt_and_sign", cipher.GCMCipher.encrypt_and_sign._ktproxy_original)
    fresh = cipher.GCMCipher("aes256-gcm", key, iv)
    assert [fresh.encrypt_and_sign(p[:4], p[4:]) for p in packets] == theirs


class _Loud:
    """A log argument that counts how often it is turned into text."""

    formatted = 0

    def __str__(self) -> str:
        type(self).formatted += 1
        return "loud"


def test_disabled_log_levels_format_nothing(caplog):
    logger = asyncssh.logging.SSHLogger(child="ktproxy-test", context="conn=1")
    _Loud.formatted = 0
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        logger.debug1("x %s %s", [_Loud()], b"bytes")
        logger.info("y %s", [_Loud(), _Loud()])
    assert _Loud.formatted == 0 and not caplog.records
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):  # enabled: the same record as asyncssh's
        logger.debug1("x %s %s", [_Loud()], b"by\x01tes")
    assert _Loud.formatted == 1
    assert [r.getMessage() for r in caplog.records] == ["[conn=1] x loud by\\x01tes"]


async def test_packets_are_not_described_unless_packet_logging_is_on(plain_pair, monkeypatch, caplog):
    conn, _ = plain_pair
    described = []
    monkeypatch.setattr(packet.SSHPacketLogger, "_log_packet",
                        lambda self, *a: described.append(a[1]), raising=True)
    for n in range(20):
        conn.send_packet(connection.MSG_IGNORE, connection.String(f"{n}".encode()))
    assert described == []
    monkeypatch.setattr(asyncssh.logging.SSHLogger, "_debug_level", 3)
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):
        conn.send_packet(connection.MSG_IGNORE, connection.String(b"x"))
    assert described == [connection.MSG_IGNORE]
