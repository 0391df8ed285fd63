"""SSH transport settings shared by both ends of the tunnel: ktctl's client and the shadow's server.

Both ends are ours, so windows may exceed OpenSSH's defaults; `benchmarks/` measures every knob here
(the tuning study in benchmarks/results/latest.md).
"""

from __future__ import annotations

from typing import Any

import asyncssh
from asyncssh import connection as _connection

WINDOW = 8 * 1024 * 1024
MAX_PKTSIZE = 32768 * 4
# AEAD first; no CBC mode is ever offered (see drop_cbc_ignore_packets).
CIPHERS = ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr"]

_MSG_IGNORE = 2
_EMPTY_STRING = b"\x00\x00\x00\x00"


def drop_cbc_ignore_packets() -> bool:
    """Stop asyncssh sending an empty SSH_MSG_IGNORE before every packet when the cipher is not CBC.

    asyncssh inserts one before each post-kex packet, the countermeasure against the CBC-mode chained-IV
    attack on SSH (predictable IV of the next packet). It doubles the packet count: dropping it cost
    29% less CPU per GB and 36% lower p99 in benchmarks/ (tuning study). AEAD and CTR modes have no
    chained IV, so for them the packet protects nothing; with a CBC cipher the original behaviour stays.
    Idempotent; returns False when asyncssh's internals are not what this expects (nothing patched).
    """
    cls = _connection.SSHConnection
    if getattr(cls.send_packet, "_ktproxy_no_cbc_ignore", False):
        return True
    if not all(hasattr(cls, a) for a in ("send_packet", "is_client")):
        return False
    original = cls.send_packet

    def send_packet(self: asyncssh.SSHClientConnection, pkttype: int, *args: bytes, handler: object = None) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,):
            alg = getattr(self, "_enc_alg_cs" if self.is_client() else "_enc_alg_sc", b"cbc")
            if b"cbc" not in alg:
                return
        original(self, pkttype, *args, handler=handler)

    send_packet._ktproxy_no_cbc_ignore = True  # type: ignore[attr-defined]
    cls.send_packet = send_packet  # type: ignore[method-assign]
    return True


# Small packets are fed in batches of at least this many bytes: each feed costs a parser call and a
# keepalive-timer reset (a packet at a time made 100-client request/response 20% slower), while
# re-slicing a batch this small after each packet costs next to nothing.
_FEED_AT_LEAST = 4096


def _bytes_needed(conn: object, pkthdr: object, packet: object) -> int:
    """What asyncssh's current parse step still needs; 0 (feed it all, as asyncssh itself does) for any
    other step, and for an asyncssh whose per-connection state is not named as this expects."""
    c: Any = conn
    try:
        step = getattr(c._recv_handler, "__func__", None)
        if step is pkthdr:
            return c._recv_blocksize - len(c._inpbuf)
        if step is packet:
            return 4 + c._pktlen + c._recv_macsize - c._recv_blocksize - len(c._inpbuf)
    except (AttributeError, TypeError):
        pass
    return 0


def feed_whole_packets() -> bool:
    """Hand asyncssh's packet parser one big SSH packet at a time instead of a whole socket read.

    asyncssh appends each read to a bytes buffer and, after every header and every packet it parses,
    re-slices the remainder (`inpbuf = inpbuf[n:]`): a copy of everything still unparsed, per packet.
    With 128 KB packets and 256 KB reads that copying was 18% of the client's CPU in a bulk download
    (py-spy, benchmarks loopback case); with many small packets per read it grows quadratically. Fed
    the bytes its current step needs (small packets: a few KB at a time), the parser's buffer holds at
    most one big packet or one small batch, and the re-slice copies next to nothing. Steps other than
    header/packet (version exchange, a packet handler still running) get the rest of the read as before.
    Idempotent; returns False when asyncssh's internals are not what this expects (nothing patched).
    """
    cls = _connection.SSHConnection
    if getattr(cls.data_received, "_ktproxy_whole_packets", False):
        return True
    needed = ("data_received", "_recv_data", "_recv_pkthdr", "_recv_packet")
    if not all(hasattr(cls, a) for a in needed):
        return False
    pkthdr, packet = cls._recv_pkthdr, cls._recv_packet

    def data_received(self: _connection.SSHConnection, data: bytes, datatype: object = None) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            need = _bytes_needed(self, pkthdr, packet)
            take = end if need <= 0 else min(end, pos + max(need, _FEED_AT_LEAST))
            self._inpbuf += view[pos:take]
            pos = take
            self._recv_data()
            if getattr(self, "_transport", None) is None:  # a parse error closed the connection
                return

    data_received._ktproxy_whole_packets = True  # type: ignore[attr-defined]
    cls.data_received = data_received  # type: ignore[method-assign]
    return True


def install() -> dict[str, bool]:
    """Apply both wire patches to asyncssh in this process; each entry point calls it once, explicitly.

    Patching at import would change asyncssh for anyone who merely imports ktproxy (the practice the
    README holds against pproxy). Returns which patches are in place (False: asyncssh's internals differ
    and its default stays).
    """
    return {"drop_cbc_ignore_packets": drop_cbc_ignore_packets(), "feed_whole_packets": feed_whole_packets()}
