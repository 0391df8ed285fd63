"""SSH transport settings shared by both ends of the tunnel: ktctl's client and the shadow's server.

Both ends are ours, so windows may exceed OpenSSH's defaults; `benchmarks/` measures every knob here
(the tuning study in benchmarks/results/latest.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import asyncssh
from asyncssh import connection as _connection
from asyncssh import logging as _sshlog
from asyncssh import packet as _packet
from asyncssh.crypto import cipher as _cipher

_log = logging.getLogger(__name__)

# The asyncssh release the per-packet patches below were written against (requirements.lock pins it;
# tests/unit/test_sshwire.py checks the two agree). They reach into asyncssh's private per-packet code, so
# under any other release each one leaves asyncssh's own behaviour in place and says so in a debug log.
ASYNCSSH_PINNED = "2.24.1"


def _pinned(patch: str, cls: object, *attrs: str) -> bool:
    """True when `patch` may be applied: the pinned asyncssh, and `cls` has every attribute it replaces."""
    version = getattr(asyncssh, "__version__", "?")
    if version != ASYNCSSH_PINNED:
        _log.debug("sshwire: %s not applied: asyncssh %s is not the pinned %s", patch, version, ASYNCSSH_PINNED)
        return False
    missing = [a for a in attrs if not hasattr(cls, a)]
    if missing:
        _log.debug("sshwire: %s not applied: asyncssh has no %s", patch, ", ".join(missing))
        return False
    return True

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


def coalesce_writes() -> bool:
    """Write the SSH packets of one event-loop turn to the socket with one system call, not one each.

    asyncssh hands every packet to `transport.write()` on its own, and uvloop writes each at once: one
    `write()` per SSH packet (1.11 per request at 100 clients, 4 per new connection, vs ~0.6 for OpenSSH),
    each a syscall that on loopback also runs the peer's TCP input. Here `_send` appends the packet to a
    per-connection list; the first packet of a turn schedules one flush with `loop.call_soon`, which hands
    the whole list to `transport.writelines()` (uvloop: one `writev`, no join copy).

    - Order: every byte asyncssh sends goes through `_send` (version line, kex, packets), and the list
      keeps their order; nothing else writes to the transport.
    - Back-pressure: asyncssh ignores the transport's pause/resume (its channels are flow-controlled by
      SSH windows), and the list never outlives the turn that filled it, so the transport sees the same
      bytes at most one turn later, and its buffer and high-water mark behave as before.
    - Close/abort/disconnect: asyncssh's `_force_close` (under all three, and under connection_lost)
      drops the transport; the list is flushed first, synchronously, so a DISCONNECT written just before
      still goes out exactly as before, then asyncssh's abort follows as before. A closing transport
      gets nothing (asyncssh had already dropped it at that point).
    """
    cls = _connection.SSHConnection
    if getattr(cls._send, "_ktproxy_coalesced", False):
        return True
    if not _pinned("coalesce_writes", cls, "_send", "_force_close", "send_packet"):
        return False
    force_close = cls._force_close

    def _send(self: _connection.SSHConnection, data: bytes) -> None:
        if not self._transport:
            return
        pending = self._ktproxy_wbuf
        if pending is None:
            self._ktproxy_wbuf = [data]
            self._loop.call_soon(self._ktproxy_flush)
        else:
            pending.append(data)

    def _ktproxy_flush(self: _connection.SSHConnection) -> None:
        pending, self._ktproxy_wbuf = self._ktproxy_wbuf, None
        transport: Any = self._transport
        if not pending or transport is None or transport.is_closing():
            return
        try:
            if len(pending) == 1:
                transport.write(pending[0])
            else:
                transport.writelines(pending)
        except ConnectionError:  # as asyncssh's own _send
            pass

    def _force_close(self: _connection.SSHConnection, exc: Exception | None) -> None:
        if self._ktproxy_wbuf is not None:
            self._ktproxy_flush()
        force_close(self, exc)

    _send._ktproxy_coalesced = True  # type: ignore[attr-defined]
    cls._ktproxy_wbuf = None  # type: ignore[attr-defined]  # per instance once a packet waits
    cls._ktproxy_flush = _ktproxy_flush  # type: ignore[attr-defined]
    cls._force_close = _force_close  # type: ignore[method-assign]
    cls._send = _send  # type: ignore[method-assign]
    return True


# Random bytes are drawn from os.urandom this many at a time (padding is 4-19 bytes per packet).
_RANDOM_POOL = 64 * 1024


class _PooledRandomOS:
    """The `os` module as asyncssh's connection.py sees it, with `urandom` served from a pool.

    Every other attribute is the real os module's. Each pooled byte comes from os.urandom (the kernel's
    CSPRNG, as before) and is handed out once, never twice; only the syscall is shared by many calls.
    """

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._forget)  # a forked child must not reuse the parent's bytes

    def _forget(self) -> None:
        self._pool, self._pos = b"", 0

    def urandom(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._pool):
            if n > _RANDOM_POOL // 4:
                return os.urandom(n)
            self._pool, pos, end = os.urandom(_RANDOM_POOL), 0, n
        self._pos = end
        return self._pool[pos:end]

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def pooled_padding() -> bool:
    """Draw SSH packet padding from a pooled os.urandom buffer: one getrandom() per 64 KiB, not per packet.

    asyncssh's send_packet pads every packet with `os.urandom(padlen)`: a getrandom() syscall per SSH
    packet, 4.8-5.4% of the busy samples of both processes at 100 clients (benchmarks/results/PROFILE.md).
    RFC 4253 (6) asks for "arbitrary-length padding ... random" so that the plaintext length and content
    do not leak; it does not ask for a syscall per packet. The padding is encrypted (AEAD, CTR) and with
    aes-gcm also authenticated; the pool is os.urandom output, each byte used once, refreshed after a
    fork, so the padding is exactly as unpredictable as before. The only other os.urandom in connection.py
    is the KEXINIT cookie (16 bytes, once per key exchange), which RFC 4253 (7.1) wants random: it gets
    pooled kernel randomness too. Nothing else in asyncssh (keys, nonces, DH secrets) is affected: only
    connection.py's module-level `os` name is replaced.
    """
    if isinstance(_connection.__dict__.get("os"), _PooledRandomOS):
        return True
    if not _pinned("pooled_padding", _connection.SSHConnection, "send_packet"):
        return False
    if _connection.__dict__.get("os") is not os:
        _log.debug("sshwire: pooled_padding not applied: asyncssh.connection has no module-level os")
        return False
    _connection.os = _PooledRandomOS()  # type: ignore[attr-defined]
    return True


_GCM_TAG = 16
_INVOCATION_MASK = 0xFFFFFFFFFFFFFFFF


def aead_per_key() -> bool:
    """Build the AES-GCM cipher object once per key, not once per packet; the nonces stay RFC 5647's.

    asyncssh's GCMCipher constructs a new `AESGCM(key)` (a key schedule in OpenSSL) for every packet it
    encrypts or decrypts and recomputes the nonce through int.from_bytes: 2.5-2.9% of the busy samples
    at 100 clients, 2.7-4.1 us per 128-byte packet against 0.6-0.85 with one object. asyncssh makes a new
    GCMCipher per direction at every key exchange, so one AESGCM per GCMCipher is one per key. The nonce
    sequence is RFC 5647 (7.1) and OpenSSH's aes*-gcm@openssh.com exactly: a fixed 4-byte field and an
    8-byte big-endian invocation counter, incremented after each packet and wrapping modulo 2**64, starting
    from the IV the key exchange derived; `_iv` is kept current as asyncssh keeps it.
    """
    cls = _cipher.GCMCipher
    if getattr(cls.encrypt_and_sign, "_ktproxy_aead_per_key", False):
        return True
    if not _pinned("aead_per_key", cls, "encrypt_and_sign", "verify_and_decrypt", "_update_iv"):
        return False
    invalid_tag = _cipher.InvalidTag

    def _ktproxy_aead(self: Any) -> Any:
        """This key's AESGCM object and the current invocation counter (made on first use)."""
        aead = _cipher.AESGCM(self._key)
        self._ktproxy_state = [aead, self._iv[:4], int.from_bytes(self._iv[4:12], "big")]
        return self._ktproxy_state

    def encrypt_and_sign(self: Any, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        state = self._ktproxy_state or _ktproxy_aead(self)
        data = state[0].encrypt(self._iv, data, header)
        state[2] = invocation = (state[2] + 1) & _INVOCATION_MASK
        self._iv = state[1] + invocation.to_bytes(8, "big")
        return header + data[:-_GCM_TAG], data[-_GCM_TAG:]

    def verify_and_decrypt(self: Any, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        state = self._ktproxy_state or _ktproxy_aead(self)
        try:
            decrypted: bytes | None = state[0].decrypt(self._iv, data + mac, header)
        except invalid_tag:
            decrypted = None
        state[2] = invocation = (state[2] + 1) & _INVOCATION_MASK
        self._iv = state[1] + invocation.to_bytes(8, "big")
        return decrypted

    encrypt_and_sign._ktproxy_aead_per_key = True  # type: ignore[attr-defined]
    encrypt_and_sign._ktproxy_original = cls.encrypt_and_sign  # type: ignore[attr-defined]  # for the tests
    cls._ktproxy_state = None  # type: ignore[attr-defined]
    cls.encrypt_and_sign = encrypt_and_sign  # type: ignore[method-assign]
    cls.verify_and_decrypt = verify_and_decrypt  # type: ignore[method-assign]
    return True


def quiet_logging() -> bool:
    """Skip asyncssh's log-argument formatting when the level is disabled (the default: logging off).

    `SSHLogger.log` turns every argument into text (bytes decoded, lists joined, host/port tuples
    formatted) before the logging module checks the level, and `SSHPacketLogger.log_sent_packet` /
    `log_received_packet` look up the packet's name and build "N bytes" for every packet before
    `SSHLogger.packet` checks asyncssh's debug level (3) and drops it: 2.4-3% of the busy samples in
    request cases, 2.6-4.9% on new connections, with nothing ever logged. Here each checks first
    (`isEnabledFor`, cached by the logging module; the debug level) and otherwise does what it did:
    with logging on, the same records come out.
    """
    logger_cls, packet_cls = _sshlog.SSHLogger, _packet.SSHPacketLogger
    if getattr(logger_cls.log, "_ktproxy_quiet", False):
        return True
    if not (_pinned("quiet_logging", logger_cls, "log", "isEnabledFor", "_debug_level")
            and _pinned("quiet_logging", packet_cls, "log_sent_packet", "log_received_packet", "_log_packet")):
        return False
    log = logger_cls.log
    debug = logging.DEBUG

    def quiet_log(self: Any, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.logger.isEnabledFor(level):
            log(self, level, msg, *args, **kwargs)

    def log_sent_packet(self: Any, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        logger = self.logger
        if logger._debug_level >= 3 and logger.isEnabledFor(debug):
            self._log_packet("Sent", pkttype, pktid, packet, note)

    def log_received_packet(self: Any, pkttype: int, pktid: int | None, packet: Any, note: str = "") -> None:
        logger = self.logger
        if logger._debug_level >= 3 and logger.isEnabledFor(debug):
            self._log_packet("Received", pkttype, pktid, packet, note)

    quiet_log._ktproxy_quiet = True  # type: ignore[attr-defined]
    logger_cls.log = quiet_log  # type: ignore[method-assign]
    packet_cls.log_sent_packet = log_sent_packet  # type: ignore[method-assign]
    packet_cls.log_received_packet = log_received_packet  # type: ignore[method-assign]
    return True


# Each patch, and how to tell it is in place in this process (benchmarks/launch.py checks them).
PATCHES = {
    "drop_cbc_ignore_packets": drop_cbc_ignore_packets,
    "feed_whole_packets": feed_whole_packets,
    "coalesce_writes": coalesce_writes,
    "pooled_padding": pooled_padding,
    "aead_per_key": aead_per_key,
    "quiet_logging": quiet_logging,
}


def installed() -> dict[str, bool]:
    """Which patches asyncssh carries in this process right now."""
    c = _connection.SSHConnection
    return {
        "drop_cbc_ignore_packets": bool(getattr(c.send_packet, "_ktproxy_no_cbc_ignore", False)),
        "feed_whole_packets": bool(getattr(c.data_received, "_ktproxy_whole_packets", False)),
        "coalesce_writes": bool(getattr(c._send, "_ktproxy_coalesced", False)),
        "pooled_padding": isinstance(_connection.__dict__.get("os"), _PooledRandomOS),
        "aead_per_key": bool(getattr(_cipher.GCMCipher.encrypt_and_sign, "_ktproxy_aead_per_key", False)),
        "quiet_logging": bool(getattr(_sshlog.SSHLogger.log, "_ktproxy_quiet", False)),
    }


def install() -> dict[str, bool]:
    """Apply the wire patches to asyncssh in this process; each entry point calls it once, explicitly.

    Patching at import would change asyncssh for anyone who merely imports ktproxy (the practice the
    README holds against pproxy). Returns which patches are in place (False: asyncssh's internals differ
    and its default stays). Looks each patch up in PATCHES at call time (benchmarks/launch.py replaces
    one there to measure asyncssh's default against it).
    """
    return {name: PATCHES[name]() for name in PATCHES}
