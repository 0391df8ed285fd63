"""Asyncio port-forward to a pod over the API server's WebSocket endpoint (v4.channel.k8s.io).

Why not kubernetes.stream.portforward: it is synchronous (a thread per forward), has no flow control
(its buffers grow without bound) and hands back a socketpair. Here the WebSocket is driven by the
`websockets` library on the event loop and wrapped in an asyncio.Transport, so asyncssh (or a
StreamReader/StreamWriter) runs directly on top of it with real back-pressure in both directions.

Framing (one forwarded port => channels 0 and 1): every binary message starts with a channel byte;
channel 0 carries data, channel 1 carries error text from the kubelet. The first message the server
sends on each channel carries the port number as 2 bytes little-endian, which is stripped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlparse

import websockets
from kubernetes.client import Configuration
from kubernetes.client.rest import should_bypass_proxies
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import Access, KubeError, forbidden_message, status_message, unauthorized
from ktproxy.errors import KtError

log = logging.getLogger("ktproxy.cluster.portforward")

SUBPROTOCOL = "v4.channel.k8s.io"
DATA_CHANNEL = 0
ERROR_CHANNEL = 1
PORT_PREFIX_LEN = 2

# Frames we send are at most this big: large enough for throughput, small enough that the kubelet's
# per-message read and a concurrent keepalive are never stuck behind one huge frame.
FRAME_SIZE = 128 * 1024
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
KEEPALIVE = 30.0
OPEN_TIMEOUT = 15.0


class PortForwardError(KtError):
    """The kubelet reported an error on the error channel, or the handshake failed."""


# ---------------------------------------------------------------------------------------- connection
def portforward_url(host: str, namespace: str, pod: str, port: int) -> str:
    """wss://HOST/api/v1/namespaces/NS/pods/POD/portforward?ports=PORT (ws:// for a plain-http server)."""
    u = urlparse(host)
    scheme = "ws" if u.scheme == "http" else "wss"
    base = f"{scheme}://{u.netloc}{u.path.rstrip('/')}"
    ns, name = quote(namespace, safe=""), quote(pod, safe="")
    return f"{base}/api/v1/namespaces/{ns}/pods/{name}/portforward?ports={port}"


def ssl_context(cfg: Configuration) -> ssl.SSLContext | None:
    """The TLS settings the kubeconfig loader put in the Configuration, as an SSLContext."""
    if urlparse(cfg.host).scheme == "http":
        return None
    ctx = ssl.create_default_context(
        cafile=cfg.ssl_ca_cert or None, cadata=getattr(cfg, "ca_cert_data", None)
    )
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    if not cfg.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cfg.assert_hostname is False:
        ctx.check_hostname = False
    return ctx


def auth_headers(cfg: Configuration) -> dict[str, str]:
    """Authorization header(s) as the REST client would send them.

    get_api_key_with_prefix runs the loader's refresh hook, so exec-plugin and expiring tokens are
    refreshed here exactly as for ordinary API calls. May run a subprocess: call it from a thread.
    """
    headers: dict[str, str] = {}
    for setting in cfg.auth_settings().values():
        if setting.get("in") == "header" and setting.get("value"):
            headers[setting["key"]] = setting["value"]
    if "authorization" not in {k.lower() for k in headers} and cfg.username and cfg.password:
        headers["Authorization"] = cfg.get_basic_auth_token()
    return headers


def ws_proxy(cfg: Configuration) -> str | None:
    """The same proxy decision the REST client makes (kubeconfig proxy-url, else environment)."""
    if cfg.proxy and not should_bypass_proxies(cfg.host, cfg.no_proxy or ""):
        return cfg.proxy
    return None


def _handshake_error(exc: BaseException, kube: KubeClient, namespace: str, pod: str, port: int) -> KtError:
    target = f"pod {namespace}/{pod} port {port}"
    if isinstance(exc, (InvalidStatus, SpdyHandshakeError)):
        if isinstance(exc, InvalidStatus):
            status, raw = exc.response.status_code, exc.response.body
        else:
            status, raw = exc.status, exc.body
        body = raw.decode("utf-8", "replace") if raw else ""
        msg = status_message(body)
        if status == 403:
            return KubeError(
                forbidden_message(body, Access("create", "pods/portforward", namespace)), 403, "Forbidden"
            )
        if status == 401:
            return unauthorized(kube.server)
        if status == 404:
            return KubeError(f"cannot port-forward to {target}: {msg or 'not found'}", 404, "NotFound")
        return KubeError(f"cannot port-forward to {target}: {msg or f'HTTP {status}'}", status)
    if isinstance(exc, TimeoutError):
        return KubeError(
            f"cannot port-forward to {target}: no answer from {kube.server} in {OPEN_TIMEOUT:g}s"
        )
    if isinstance(exc, ssl.SSLError):
        return KubeError(f"TLS error talking to the API server {kube.server}: {exc}")
    if isinstance(exc, OSError):
        return KubeError(f"cannot reach the Kubernetes API server at {kube.server}: {exc.strerror or exc}")
    return KubeError(f"cannot port-forward to {target}: {exc}")


async def connect_websocket(kube: KubeClient, namespace: str, pod: str, port: int) -> ClientConnection:
    """Open the port-forward WebSocket; errors become one line (403 names pods/portforward)."""
    cfg = kube.configuration
    url = portforward_url(cfg.host, namespace, pod, port)
    try:
        headers = await asyncio.to_thread(auth_headers, cfg)
        ctx = ssl_context(cfg)
    except Exception as exc:  # exec plugin failed, unreadable cert file
        raise KubeError(f"cannot get credentials for {kube.server}: {exc}") from None
    kwargs: dict[str, Any] = {}
    if ctx is not None:
        kwargs["ssl"] = ctx
        if cfg.tls_server_name:
            kwargs["server_hostname"] = cfg.tls_server_name
    try:
        ws = await websockets.connect(
            url,
            subprotocols=[SUBPROTOCOL],
            additional_headers=headers,
            proxy=ws_proxy(cfg),
            compression=None,  # payload is SSH ciphertext: deflate would only burn CPU
            open_timeout=OPEN_TIMEOUT,
            # Our own keepalive (see PortForwardTransport._keepalive) understands back-pressure;
            # websockets' would kill a connection whose reader we paused on purpose.
            ping_interval=None,
            ping_timeout=None,
            close_timeout=5,
            max_size=8 * 1024 * 1024,
            max_queue=16,  # bounded: with reading paused, TCP back-pressure reaches the kubelet
            write_limit=256 * 1024,
            user_agent_header="ktproxy",
            **kwargs,
        )
    except (InvalidHandshake, OSError, TimeoutError, ssl.SSLError) as exc:
        raise _handshake_error(exc, kube, namespace, pod, port) from None
    if ws.subprotocol != SUBPROTOCOL:
        await ws.close()
        raise KubeError(f"the API server did not accept the {SUBPROTOCOL} port-forward protocol")
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # SSH packets are small and latency-bound; Nagle would add 40 ms stalls.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return ws


# ---------------------------------------------------------------------------------------- transport
class PortForwardTransport(asyncio.Transport):
    """asyncio.Transport over one port-forward WebSocket (data channel 0, error channel 1)."""

    def __init__(
        self,
        ws: ClientConnection,
        protocol: asyncio.BaseProtocol,
        *,
        label: str = "",
        keepalive: float | None = KEEPALIVE,
        frame_size: int = FRAME_SIZE,
    ) -> None:
        super().__init__(extra={"websocket": ws, "peername": None, "sockname": None, "socket": None})
        self._ws = ws
        self._protocol: Any = protocol
        self._label = label
        self._keepalive_interval = keepalive
        self._frame_size = frame_size
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._high = HIGH_WATER
        self._low = LOW_WATER
        self._protocol_paused = False  # we told the protocol to stop writing
        self._reading_paused = False  # the protocol told us to stop reading
        self._pause_epoch = 0
        self._resume = asyncio.Event()
        self._resume.set()
        self._wake_writer = asyncio.Event()
        self._closing = False
        self._lost = False
        self._prefix_left = {DATA_CHANNEL: PORT_PREFIX_LEN, ERROR_CHANNEL: PORT_PREFIX_LEN}
        self._error = bytearray()
        self._tasks: list[asyncio.Task[None]] = []

    def _start(self) -> None:
        self._tasks.append(self._loop.create_task(self._reader(), name=f"pf-read {self._label}"))
        self._tasks.append(self._loop.create_task(self._writer(), name=f"pf-write {self._label}"))
        if self._keepalive_interval:
            self._tasks.append(self._loop.create_task(self._keepalive(), name=f"pf-keepalive {self._label}"))

    # -- reading
    async def _reader(self) -> None:
        exc: BaseException | None = None
        try:
            while True:
                if self._reading_paused:
                    await self._resume.wait()
                msg = await self._ws.recv(decode=False)
                if not msg:
                    continue
                channel = msg[0]
                payload = msg[1:]
                left = self._prefix_left.get(channel, 0)
                if left:
                    strip = min(left, len(payload))
                    self._prefix_left[channel] = left - strip
                    payload = payload[strip:]
                if not payload:
                    continue
                if channel == DATA_CHANNEL:
                    if not self._closing:
                        self._protocol.data_received(payload)
                elif channel == ERROR_CHANNEL:
                    self._error += payload
                    log.debug(
                        "port-forward %s error channel: %s", self._label, payload.decode("utf-8", "replace")
                    )
                else:
                    log.debug("port-forward %s: frame for unknown channel %d ignored", self._label, channel)
        except ConnectionClosed as cc:
            if self._error:
                exc = PortForwardError(self._error_text())
            elif cc.rcvd is None and not self._closing:
                # No close frame from the server: the TCP connection died under us.
                exc = ConnectionResetError(f"port-forward {self._label} connection lost")
        except asyncio.CancelledError:
            exc = None
            raise
        except Exception as e:  # a protocol's data_received raising must still end the connection once
            exc = e
            log.debug("port-forward %s reader failed", self._label, exc_info=True)
        finally:
            if self._error and exc is None and not self._closing:
                exc = PortForwardError(self._error_text())
            self._connection_lost(exc)

    def _error_text(self) -> str:
        text = self._error.decode("utf-8", "replace").strip()
        return f"port-forward to {self._label} failed: {text}"

    def pause_reading(self) -> None:
        if not self._reading_paused and not self._lost:
            self._reading_paused = True
            self._pause_epoch += 1
            self._resume.clear()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._resume.set()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    # -- writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return  # like asyncio's transports: writes after close are dropped
        if not data:
            return
        self._buf += data
        self._wake_writer.set()
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                log.debug("pause_writing failed", exc_info=True)

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                log.debug("resume_writing failed", exc_info=True)

    async def _writer(self) -> None:
        try:
            while True:
                if not self._buf:
                    if self._closing:
                        break
                    self._wake_writer.clear()
                    await self._wake_writer.wait()
                    continue
                n = min(len(self._buf), self._frame_size)
                frame = bytearray(n + 1)
                frame[1:] = memoryview(self._buf)[:n]  # frame[0] == DATA_CHANNEL (0)
                del self._buf[:n]  # O(1): bytearray keeps a start offset
                await self._ws.send(frame)  # waits while the socket's buffer is above write_limit
                self._maybe_resume_protocol()
            await self._ws.close()
        except ConnectionClosed:
            self._buf.clear()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("port-forward %s writer failed", self._label, exc_info=True)
            self._ws.transport.abort()

    def get_write_buffer_size(self) -> int:
        ws_buffered = 0
        with contextlib.suppress(Exception):
            ws_buffered = self._ws.transport.get_write_buffer_size()
        return len(self._buf) + ws_buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def can_write_eof(self) -> bool:
        # v4.channel.k8s.io has no half-close: closing the data channel closes the whole forward.
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("port-forward WebSockets cannot half-close (v4.channel.k8s.io)")

    # -- keepalive
    async def _keepalive(self) -> None:
        """Keep the kubelet's idle timer and middleboxes happy, and notice a dead connection.

        The kubelet resets --streaming-connection-idle-timeout only on *messages*, so an empty binary
        message is sent (the kubelet skips zero-length messages). A ping checks liveness; a missing pong
        only counts when neither side was deliberately back-pressured in the meantime, because a paused
        reader (ours, or the kubelet's) also delays pongs.
        """
        interval = self._keepalive_interval or KEEPALIVE
        try:
            while not self._closing and not self._lost:
                await asyncio.sleep(interval)
                if self._closing or self._lost:
                    return
                await self._ws.send(b"")
                epoch = self._pause_epoch
                idle_before = self.get_write_buffer_size() == 0
                pong = await self._ws.ping()
                try:
                    await asyncio.wait_for(asyncio.shield(pong), interval)
                except TimeoutError:
                    paused = self._reading_paused or epoch != self._pause_epoch
                    if not paused and idle_before and self.get_write_buffer_size() == 0:
                        log.warning(
                            "port-forward %s: no answer to keepalive in %gs, closing", self._label, interval
                        )
                        self._ws.transport.abort()
                        return
        except (ConnectionClosed, asyncio.CancelledError):
            return

    # -- closing
    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush what is buffered, then close the WebSocket; connection_lost follows."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._wake_writer.set()
        self._resume.set()  # a paused reader must see the close

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._buf.clear()
        self._resume.set()
        with contextlib.suppress(Exception):
            self._ws.transport.abort()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._buf.clear()
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current and not t.done():
                t.cancel()
        if exc is not None:
            log.debug("port-forward %s lost: %s", self._label, exc)
        # The protocol is told exactly once, on the loop, like asyncio's own transports do.
        try:
            self._protocol.connection_lost(exc)
        except Exception:
            log.debug("connection_lost raised", exc_info=True)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    async def wait_closed(self) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


# ---------------------------------------------------------------------------------------- SPDY
# The port-forward API's other protocol (kubectl's own before WebSockets): an HTTP/1.1 upgrade to
# SPDY/3.1, one stream per direction-pair. The API server and the kubelet only copy the upgraded bytes
# and containerd frames them with spdystream: measured on the local cluster (issue 15) the cluster spends
# ~6 CPU-s/GB on a SPDY download against ~11-16 on v4.channel.k8s.io, whose containerd side (wsstream
# over x/net/websocket: an allocation, a copy and two writes per 32 KiB message) and kubelet proxy cost
# ~3x and ~1.7x as much. So SPDY is the default; WebSockets remain for proxies and as a fallback.
SPDY_UPGRADE = "SPDY/3.1"
SPDY_PROTOCOL = "portforward.k8s.io"
SPDY_ERROR_STREAM, SPDY_DATA_STREAM = 1, 3  # client-initiated streams are odd
SPDY_SYN_STREAM, SPDY_SYN_REPLY, SPDY_RST_STREAM, SPDY_PING, SPDY_GOAWAY = 1, 2, 3, 6, 7
SPDY_FLAG_FIN = 0x01
_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")
ERROR_GRACE = 1.0  # seconds the error stream gets to explain a closed data stream

SPDY_DICTIONARY = (
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\x00\x06de"
    b"lete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\x00\x00\x0faccept-"
    b"encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\raccept-ranges\x00\x00\x00\x03age\x00\x00\x00"
    b"\x05allow\x00\x00\x00\rauthorization\x00\x00\x00\rcache-control\x00\x00\x00\nconnection\x00\x00\x00"
    b"\x0ccontent-base\x00\x00\x00\x10content-encoding\x00\x00\x00\x10content-language\x00\x00\x00\x0econt"
    b"ent-length\x00\x00\x00\x10content-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\rcontent-range\x00"
    b"\x00\x00\x0ccontent-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00"
    b"\x07expires\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modifi"
    b"ed-since\x00\x00\x00\rif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-since\x00"
    b"\x00\x00\rlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma"
    b"\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00"
    b"\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07tr"
    b"ailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\nuser-agent\x00\x00\x00"
    b"\x04vary\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\x06me"
    b"thod\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200 OK\x00\x00\x00\x07version\x00\x00"
    b"\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\nset-cookie\x00\x00\x00\nkeep-"
    b"alive\x00\x00\x00\x06origin1001012012022052063003023033043053063074024054064074084094104114124134144"
    b"15416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    b"401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Un"
    b"availableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun"
    b", GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plai"
    b"n,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0"
    b"."
)

class SpdyHandshakeError(Exception):
    """The API server answered the SPDY upgrade with HTTP `status` (body kept for the message)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def spdy_header_block(headers: dict[str, str]) -> bytes:
    """An uncompressed SPDY/3 name/value block (names lower-case, as spdystream writes them)."""
    out = [_U32.pack(len(headers))]
    for name, value in headers.items():
        n, v = name.lower().encode(), value.encode()
        out += [_U32.pack(len(n)), n, _U32.pack(len(v)), v]
    return b"".join(out)


def spdy_data_header(stream: int, length: int, flags: int = 0) -> bytes:
    return _U32x2.pack(stream & 0x7FFFFFFF, (flags << 24) | length)


def spdy_control(ftype: int, flags: int, body: bytes) -> bytes:
    return _U32x2.pack(0x80030000 | ftype, (flags << 24) | len(body)) + body


class SpdyPortForwardTransport(asyncio.Transport):
    """asyncio.Transport over one SPDY/3.1 port-forward connection (error stream 1, data stream 3).

    It is the Protocol of the TLS connection too: received frames are parsed in place (one copy per
    data frame, into the bytes handed to the app protocol), writes go out as data frames of up to
    frame_size, and the TLS transport's flow control is passed through in both directions.
    """

    def __init__(self, *, label: str = "", keepalive: float | None = KEEPALIVE, frame_size: int = FRAME_SIZE) -> None:
        super().__init__(extra={"peername": None, "sockname": None, "socket": None})
        self._label = label
        self._keepalive_interval = keepalive
        self._frame_size = min(frame_size, 0xFFFFFF)
        self._protocol: Any = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._head = bytearray()
        self._handshake: asyncio.Future[bytes] = self._loop.create_future()
        self._buf = bytearray()  # an incomplete frame; before _start, everything after the response head
        self._started = False
        self._data_fin = self._error_fin = False
        self._lost_exc: BaseException | None = None
        self._more = asyncio.Event()
        self._deflate = zlib.compressobj(zdict=SPDY_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=SPDY_DICTIONARY)
        self._error = bytearray()
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._pause_epoch = 0
        self._writing_paused = False
        self._pong: asyncio.Future[None] | None = None
        self._ping_id = 1
        self._tasks: list[asyncio.Task[None]] = []

    # -- the TLS connection's protocol side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self._extra.update(socket=None, peername=transport.get_extra_info("peername"),
                           sockname=transport.get_extra_info("sockname"))
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        if not self._handshake.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self._handshake.set_exception(SpdyHandshakeError(0, b"response headers too long"))
                return
            head, rest = bytes(self._head[:end + 4]), bytes(self._head[end + 4:])
            self._head = bytearray()
            self._handshake.set_result(head)
            self._buf += rest  # frames (or an error body) that came with the response
            return
        if not self._started:
            self._buf += data
            self._more.set()
            return
        if self._lost:
            return
        try:
            self._frames(data)
        except Exception as exc:  # the app protocol raised, or a malformed frame
            log.debug("port-forward %s: receive failed", self._label, exc_info=True)
            self._connection_lost(exc)

    def _frames(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        view = memoryview(data)
        pos, end = 0, len(data)
        while end - pos >= 8:
            word, flags_len = _U32x2.unpack_from(data, pos)
            length = flags_len & 0xFFFFFF
            if end - pos - 8 < length:
                break
            flags = flags_len >> 24
            body = view[pos + 8:pos + 8 + length]
            pos += 8 + length
            if word & 0x80000000:
                self._control(word & 0xFFFF, flags, body)
            else:
                self._data(word, flags, body)
            if self._lost:
                return
        if pos < end:
            self._buf += view[pos:]

    def _data(self, stream: int, flags: int, body: memoryview) -> None:
        if stream == SPDY_DATA_STREAM:
            if body and not self._closing:
                self._protocol.data_received(bytes(body))
            if flags & SPDY_FLAG_FIN:  # the pod's end closed: the reason, if any, follows on the error stream
                self._data_fin = True
                if self._error_fin:
                    self._finish()
                else:  # as kubectl does, give the error stream a moment to say why
                    self._loop.call_later(ERROR_GRACE, self._finish)
        elif stream == SPDY_ERROR_STREAM:
            self._error += body
            if body:
                log.debug("port-forward %s error stream: %s", self._label, bytes(body).decode("utf-8", "replace"))
            if flags & SPDY_FLAG_FIN:
                self._error_fin = True
                if self._error or self._data_fin:
                    self._finish()

    def _finish(self) -> None:
        self._connection_lost(PortForwardError(self._error_text()) if self._error else None)

    def _control(self, ftype: int, flags: int, body: memoryview) -> None:
        if ftype == SPDY_SYN_REPLY and len(body) >= 4:
            self._inflate.decompress(body[4:])  # keeps the shared zlib stream in step; headers unused
        elif ftype == SPDY_PING and len(body) == 4:
            (ping_id,) = _U32.unpack_from(body)
            if ping_id % 2 == 0:  # the server's: echo it
                self._send(spdy_control(SPDY_PING, 0, bytes(body)))
            elif self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        elif ftype == SPDY_RST_STREAM and len(body) >= 8:
            stream, status = _U32x2.unpack_from(body)
            if stream & 0x7FFFFFFF == SPDY_DATA_STREAM:
                self._connection_lost(PortForwardError(self._error_text()) if self._error else
                                      ConnectionResetError(f"port-forward {self._label} reset (status {status})"))
        elif ftype == SPDY_GOAWAY:
            self._connection_lost(PortForwardError(self._error_text()) if self._error else None)
        elif ftype == SPDY_SYN_STREAM:  # the server never opens streams on a port-forward
            log.debug("port-forward %s: unexpected SYN_STREAM ignored", self._label)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._more.set()
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionResetError("connection closed during the upgrade"))
        if self._lost:
            return
        if self._error:
            exc = PortForwardError(self._error_text())
        elif exc is None and not self._closing:
            exc = ConnectionResetError(f"port-forward {self._label} connection lost")
        self._connection_lost(exc)

    def pause_writing(self) -> None:  # the TLS transport is above its high-water mark
        self._writing_paused = True
        with contextlib.suppress(Exception):
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        with contextlib.suppress(Exception):
            self._protocol.resume_writing()

    # -- opening
    async def _open(self, request: bytes, port: int) -> None:
        assert self._transport is not None
        self._transport.write(request)
        head = await self._handshake
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            length = 0
            for line in rest.split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    length = min(int(value.strip()), 65536)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while len(self._buf) < length and not self._transport.is_closing():
                        self._more.clear()
                        await self._more.wait()
            raise SpdyHandshakeError(status, bytes(self._buf[:length]))
        headers = {"streamtype": "error", "port": str(port), "requestid": "0"}
        self._syn_stream(SPDY_ERROR_STREAM, headers, fin=True)  # we never write on the error stream
        headers["streamtype"] = "data"
        self._syn_stream(SPDY_DATA_STREAM, headers)

    def _syn_stream(self, stream: int, headers: dict[str, str], fin: bool = False) -> None:
        block = self._deflate.compress(spdy_header_block(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        body = _U32x2.pack(stream, 0) + b"\0\0" + block  # associated stream 0, priority 0, slot 0
        self._send(spdy_control(SPDY_SYN_STREAM, SPDY_FLAG_FIN if fin else 0, body))

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _start(self) -> None:
        self._started = True
        if self._lost:  # lost between the upgrade and now: the app protocol still hears it, once
            self._lost = False
            self._connection_lost(self._lost_exc)
            return
        if self._keepalive_interval:
            self._tasks.append(self._loop.create_task(self._keepalive(), name=f"pf-keepalive {self._label}"))
        if self._buf:
            pending = bytes(self._buf)
            self._buf.clear()
            self.data_received(pending)

    async def _keepalive(self) -> None:
        """SPDY PINGs (spdystream answers them): keep middleboxes happy and notice a dead connection;
        a missing answer only counts when neither side was back-pressured meanwhile (as for WebSockets)."""
        interval = self._keepalive_interval or KEEPALIVE
        with contextlib.suppress(asyncio.CancelledError):
            while not self._closing and not self._lost:
                await asyncio.sleep(interval)
                if self._closing or self._lost:
                    return
                epoch, idle_before = self._pause_epoch, self.get_write_buffer_size() == 0
                self._pong = self._loop.create_future()
                self._send(spdy_control(SPDY_PING, 0, _U32.pack(self._ping_id)))
                self._ping_id += 2
                try:
                    await asyncio.wait_for(asyncio.shield(self._pong), interval)
                except TimeoutError:
                    paused = self._reading_paused or epoch != self._pause_epoch
                    if not paused and idle_before and self.get_write_buffer_size() == 0:
                        log.warning("port-forward %s: no answer to keepalive in %gs, closing", self._label, interval)
                        self.abort()
                        return

    # -- the app protocol's transport side
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data or self._transport is None:
            return
        n, step = len(data), self._frame_size
        if n <= step:
            self._transport.write(spdy_data_header(SPDY_DATA_STREAM, n) + bytes(data))
            return
        view = memoryview(data)
        self._transport.writelines(
            [spdy_data_header(SPDY_DATA_STREAM, len(view[i:i + step])) + bytes(view[i:i + step])
             for i in range(0, n, step)]
        )

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def pause_reading(self) -> None:
        if not self._reading_paused and not self._lost and self._transport is not None:
            self._reading_paused = True
            self._pause_epoch += 1
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            if not self._lost:
                self._transport.resume_reading()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits() if self._transport is not None else (0, 0)

    def can_write_eof(self) -> bool:
        return False  # as for WebSockets: the forward has no useful half-close

    def write_eof(self) -> None:
        raise NotImplementedError("port-forward connections do not half-close here")

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush what is buffered, end the data stream, close the connection; connection_lost follows."""
        if self._closing or self._lost:
            return
        self._closing = True
        if self._transport is not None:
            self._send(spdy_data_header(SPDY_DATA_STREAM, 0, SPDY_FLAG_FIN))
            self._transport.close()
        else:
            self._connection_lost(None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        else:
            self._connection_lost(None)

    def _error_text(self) -> str:
        text = self._error.decode("utf-8", "replace").strip()
        return f"port-forward to {self._label} failed: {text}"

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._lost_exc = exc
        self._closing = True
        for t in self._tasks:
            if t is not asyncio.current_task() and not t.done():
                t.cancel()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if exc is not None:
            log.debug("port-forward %s lost: %s", self._label, exc)
        if self._protocol is not None:
            try:
                self._protocol.connection_lost(exc)
            except Exception:
                log.debug("connection_lost raised", exc_info=True)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    async def wait_closed(self) -> None:
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


async def connect_spdy(
    kube: KubeClient, namespace: str, pod: str, port: int, *, keepalive: float | None = KEEPALIVE
) -> SpdyPortForwardTransport:
    """Open a SPDY/3.1 port-forward (no app protocol yet: set_protocol, then _start)."""
    cfg = kube.configuration
    u = urlparse(portforward_url(cfg.host, namespace, pod, port))
    try:
        headers = await asyncio.to_thread(auth_headers, cfg)
        ctx = ssl_context(cfg)
    except Exception as exc:
        raise KubeError(f"cannot get credentials for {kube.server}: {exc}") from None
    host, tport = u.hostname or "", u.port or (80 if u.scheme == "ws" else 443)
    lines = [f"POST {u.path}?{u.query} HTTP/1.1", f"Host: {u.netloc}", "User-Agent: ktproxy", "Content-Length: 0",
             "Connection: Upgrade", f"Upgrade: {SPDY_UPGRADE}", f"X-Stream-Protocol-Version: {SPDY_PROTOCOL}",
             *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    tr = SpdyPortForwardTransport(label=f"{namespace}/{pod}:{port}", keepalive=keepalive)
    kwargs: dict[str, Any] = {}
    if ctx is not None:
        kwargs["ssl"] = ctx
        kwargs["server_hostname"] = cfg.tls_server_name or host
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            await loop.create_connection(lambda: tr, host, tport, **kwargs)
            await tr._open(request, port)
    except SpdyHandshakeError:
        tr.abort()
        raise
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        tr.abort()
        raise _handshake_error(exc, kube, namespace, pod, port) from None
    return tr


# ---------------------------------------------------------------------------------------- tunnel
class PortForwardTunnel:
    """An asyncssh `tunnel=` object: every create_connection is a new port-forward to POD:PORT.

    asyncssh.connect(host, tunnel=PortForwardTunnel(kube, ns, pod, 2222)) — host/port it passes are
    ignored (the pod and port are fixed); give host a stable name for known_hosts matching.
    """

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        pod: str,
        port: int,
        *,
        keepalive: float | None = KEEPALIVE,
        protocol: str | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.pod = pod
        self.port = port
        self.keepalive = keepalive
        # "websocket" (v4.channel.k8s.io, the default) or "spdy" (cheaper for the cluster, see SPDY above:
        # 0.40x -> 0.47x kubectl's download rate, 13% less ktctl CPU per GB; opt-in with
        # KTPROXY_PORTFORWARD_PROTOCOL=spdy until the whole e2e suite has run over it). Through an HTTP
        # proxy: always WebSockets.
        self.protocol = protocol or os.environ.get("KTPROXY_PORTFORWARD_PROTOCOL", "websocket")

    async def create_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
    ) -> tuple[PortForwardTransport, asyncio.BaseProtocol]:
        if self.protocol == "spdy" and ws_proxy(self.kube.configuration) is None:
            try:
                tr = await connect_spdy(self.kube, self.namespace, self.pod, self.port, keepalive=self.keepalive)
            except SpdyHandshakeError as exc:
                if exc.status in (401, 403, 404):
                    raise _handshake_error(exc, self.kube, self.namespace, self.pod, self.port) from None
                log.debug("SPDY port-forward refused (HTTP %d): trying WebSockets", exc.status)
            else:
                app = protocol_factory()
                tr.set_protocol(app)
                try:
                    app.connection_made(tr)
                except BaseException:
                    tr.abort()
                    raise
                tr._start()
                return tr, app  # type: ignore[return-value]
        ws = await connect_websocket(self.kube, self.namespace, self.pod, self.port)
        protocol = protocol_factory()
        transport = PortForwardTransport(
            ws, protocol, label=f"{self.namespace}/{self.pod}:{self.port}", keepalive=self.keepalive
        )
        try:
            protocol.connection_made(transport)
        except BaseException:
            transport.abort()
            raise
        transport._start()
        return transport, protocol

    def __repr__(self) -> str:
        return f"port-forward {self.namespace}/{self.pod}:{self.port}"


async def open_stream(
    kube: KubeClient,
    namespace: str,
    pod: str,
    port: int,
    *,
    limit: int = 2**16,
    keepalive: float | None = KEEPALIVE,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """(reader, writer) to POD:PORT; the reader's buffer limit bounds memory (reading pauses)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    tunnel = PortForwardTunnel(kube, namespace, pod, port, keepalive=keepalive)
    transport, protocol = await tunnel.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop)
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer
