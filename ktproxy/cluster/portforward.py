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
import socket
import ssl
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
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
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
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.pod = pod
        self.port = port
        self.keepalive = keepalive

    async def create_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | None = None,
        port: int | None = None,
    ) -> tuple[PortForwardTransport, asyncio.BaseProtocol]:
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
