"""The local proxy port: SOCKS5, SOCKS4a, HTTP CONNECT, absolute-URI HTTP and the PAC file, on one port.

The first byte picks the protocol (0x05 SOCKS5, 0x04 SOCKS4, a token character HTTP). Each connection
is handled in its own task. Whatever goes wrong before a client has its answer ends in its protocol's
error reply (a SOCKS reply code, HTTP 4xx/502/504) and a closed connection, never a bare close, and
never disturbs the others. Nothing waits without a bound: see the timeouts below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncssh

from ktproxy import aio
from ktproxy.errors import KtError
from ktproxy.mesh.marks import MeshMarks
from ktproxy.pac import CONTENT_TYPE as PAC_TYPE
from ktproxy.proxy import http, socks
from ktproxy.proxy.dialer import Dialer, DialError, set_nodelay
from ktproxy.proxy.relay import Idle, Touching, relay
from ktwire import http1

log = logging.getLogger("ktproxy.proxy")

HTTP_DIAL_STATUS = {"timeout": 504}
HANDSHAKE_TIMEOUT = 30.0  # a new client's SOCKS negotiation (auth included) or first HTTP head
KEEPALIVE_TIMEOUT = 120.0  # an HTTP client connection idle between requests
EXCHANGE_IDLE_TIMEOUT = 300.0  # one HTTP request/response with no byte moving either way (head wait included)
# RFC 9110 9.2.2: the methods a proxy may repeat when it cannot tell whether the origin got them.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Failures of the network or the tunnel: one log line, no traceback (anything else is a bug).
EXPECTED = (OSError, EOFError, KtError, asyncssh.Error)

Streams = tuple[Any, Any]


class _MidResponse(ConnectionError):
    """The upstream broke a response after its head was relayed: the only honest signal is to close."""


class _Stale(Exception):
    """A kept-alive upstream closed before answering a request that is safe to send again."""


class _DialFailed(Exception):
    """A dial that failed and was logged; `kind` picks the protocol's answer."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Upstream:
    """The HTTP client connection's current upstream, kept alive between requests to the same host:port."""

    def __init__(self) -> None:
        self.streams: Streams | None = None
        self.key: tuple[str, int] | None = None

    def usable_for(self, key: tuple[str, int]) -> bool:
        if self.streams is None or self.key != key:
            return False
        reader, writer = self.streams
        return not (reader.at_eof() or writer.is_closing())

    async def close(self) -> None:
        await http.close_quietly(self.streams[1] if self.streams else None)
        self.streams = self.key = None


class ProxyServer:
    def __init__(self, dialer: Dialer, pac: Callable[[], str] | None = None,
                 credentials: tuple[str, str] | None = None, marks: MeshMarks | None = None) -> None:
        self.dialer = dialer
        self.pac = pac
        self.credentials = credentials
        # The headers `ktctl mesh --auto-header` runs ask for (None: never add one). Settable before
        # start(): connect hands it over once it knows its namespace and cluster domain.
        self.marks = marks
        self._server: asyncio.AbstractServer | None = None
        self._bind_host = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 2223) -> None:
        self._bind_host = host
        self._server = await asyncio.start_server(self._accept, host, port, limit=http1.MAX_HEAD + 1024)

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing = True
        if self._server:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task(aio.running_loop())
        assert task is not None
        self._tasks.add(task)
        self.active += 1
        set_nodelay(writer)
        try:
            await self._handle(reader, writer)
        except EXPECTED as exc:
            log.debug("proxy connection ended: %s", exc or type(exc).__name__)
        except Exception:  # keep serving others whatever one connection does
            log.exception("proxy connection failed")
        except asyncio.CancelledError:
            # Cancelled by close(): end normally. On Python 3.11 a cancelled client-connected task
            # makes asyncio's own done-callback (task.exception()) log a spurious traceback.
            if not self._closing:
                raise
        finally:
            self.active -= 1
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with aio.Deadline(HANDSHAKE_TIMEOUT):
                first = await reader.readexactly(1)
        except (TimeoutError, asyncio.IncompleteReadError):
            return
        if first[0] == socks.SOCKS5:
            await self._socks5(reader, writer)
        elif first[0] == socks.SOCKS4:
            await self._socks4(reader, writer)
        elif first[0] in http1.TCHAR:  # a method is a token (RFC 9110 9.1)
            await self._http(reader, writer, first)
        else:
            log.debug("unknown protocol byte %r", first)

    async def _dial(self, what: str, host: str, port: int) -> Streams:
        """The upstream streams; any failure is logged in one line and raised as _DialFailed(kind)."""
        try:
            return await self.dialer.dial(host, port)
        except DialError as exc:
            kind, message = exc.kind, str(exc)
        except TimeoutError:
            kind, message = "timeout", "timed out"
        except EXPECTED as exc:
            kind, message = "failure", str(exc) or type(exc).__name__
        except Exception as exc:
            log.exception("%s %s:%s: dial failed", what, host, port)
            raise _DialFailed("failure", f"{host}:{port}: {exc!r}") from exc
        log.info("%s %s:%s: %s", what, host, port, message)
        raise _DialFailed(kind, message)

    async def _dial_http(self, host: str, port: int) -> Streams:
        """The upstream of absolute-URI requests (a seam benchmarks/fastpath.py replaces)."""
        return await self._dial("HTTP", host, port)

    @staticmethod
    async def _tunnel(what: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: Any, up_writer: Any) -> None:
        """The raw stream after the client had its success answer: an error now can only close it."""
        try:
            await relay(reader, writer, up_reader, up_writer)
        except TimeoutError:
            log.info("%s: no traffic either way for too long, closed", what)
        except EXPECTED as exc:
            log.debug("%s: stream ended: %s", what, exc or type(exc).__name__)

    # -- SOCKS ----------------------------------------------------------------------------------
    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with aio.Deadline(HANDSHAKE_TIMEOUT):  # greeting, user/password and request alike
                req = await self._socks5_handshake(reader, writer)
        except socks.SocksError as exc:
            log.info("bad SOCKS5 request: %s", exc)
            if exc.reply is not None:
                writer.write(socks.socks5_reply(exc.reply))
            return
        except TimeoutError:
            log.info("SOCKS5 client sent no complete request in %g s", HANDSHAKE_TIMEOUT)
            return
        if req is None:
            return
        try:
            up_reader, up_writer = await self._dial("SOCKS5", req.host, req.port)
        except _DialFailed as exc:
            writer.write(socks.socks5_reply(socks.DIAL_ERROR_REPLY.get(exc.kind, socks.REP_FAILURE)))
            return
        writer.write(socks.socks5_reply(socks.REP_OK))
        await self._tunnel(f"SOCKS5 {req.host}:{req.port}", reader, writer, up_reader, up_writer)

    async def _socks5_handshake(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> socks.SocksRequest | None:
        """The CONNECT request after method selection and authentication, or None when refused."""
        methods = await socks.read_socks5_greeting(reader)
        wanted = socks.METHOD_USERPASS if self.credentials else socks.METHOD_NONE
        if wanted not in methods:
            writer.write(bytes([socks.SOCKS5, socks.METHOD_UNACCEPTABLE]))
            return None
        writer.write(bytes([socks.SOCKS5, wanted]))
        if self.credentials:
            ok = http.credentials_match(await socks.read_userpass(reader), self.credentials)
            writer.write(bytes([0x01, 0x00 if ok else 0x01]))
            if not ok:
                log.info("SOCKS5 client sent wrong credentials")
                return None
        return await socks.read_socks5_request(reader)

    async def _socks4(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.credentials:  # SOCKS4 has no passwords; refuse rather than bypass authentication
            writer.write(socks.socks4_reply(False))
            return
        try:
            async with aio.Deadline(HANDSHAKE_TIMEOUT):
                req = await socks.read_socks4_request(reader)
        except (TimeoutError, socks.SocksError) as exc:
            log.info("bad SOCKS4 request: %s", exc or "timed out")
            writer.write(socks.socks4_reply(False))
            return
        try:
            up_reader, up_writer = await self._dial("SOCKS4", req.host, req.port)
        except _DialFailed:
            writer.write(socks.socks4_reply(False))
            return
        writer.write(socks.socks4_reply(True))
        await self._tunnel(f"SOCKS4 {req.host}:{req.port}", reader, writer, up_reader, up_writer)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        upstream = _Upstream()
        what = "HTTP proxy"
        try:
            try:
                async with aio.Deadline(HANDSHAKE_TIMEOUT):
                    req = await http1.read_request(reader, first)
            except TimeoutError:
                log.info("HTTP client sent no complete request in %g s", HANDSHAKE_TIMEOUT)
                return
            while req is not None:
                what = f"HTTP {req.method} {req.target[:200]}"
                if req.method == "CONNECT" or req.target.startswith("/"):
                    await upstream.close()  # not needed while a tunnel runs, maybe for hours
                    await self._http_local_or_connect(req, reader, writer)
                    return
                if not http.check_proxy_auth(req, self.credentials):
                    writer.write(self._auth_required())
                    return
                if not await self._forward(req, reader, writer, upstream):
                    return
                try:
                    async with aio.Deadline(KEEPALIVE_TIMEOUT):
                        req = await http1.read_request(reader)
                except TimeoutError:
                    log.debug("idle HTTP client connection closed after %g s", KEEPALIVE_TIMEOUT)
                    return
        except _MidResponse as exc:
            log.info("%s: upstream broke the response after its head: %s", what, exc)
        except Exception as exc:
            status = self._http_error_status(what, exc)
            with contextlib.suppress(Exception):
                writer.write(http1.simple_response(status, f"ktproxy: {exc or type(exc).__name__}\n"))
        finally:
            await upstream.close()

    @staticmethod
    def _http_error_status(what: str, exc: Exception) -> int:
        """The answer for a failure before the client had a response head, logged in one line."""
        if isinstance(exc, http1.HTTPError):
            log.info("%s: %s", what, exc)
            return exc.status
        if isinstance(exc, _DialFailed):
            return HTTP_DIAL_STATUS.get(exc.kind, 502)
        if isinstance(exc, TimeoutError):
            log.info("%s: timed out", what)
            return 504
        if isinstance(exc, EXPECTED):
            log.info("%s: %s", what, exc or type(exc).__name__)
        else:
            log.error("%s: failed", what, exc_info=exc)
        return 502

    async def _forward(self, req: http1.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       upstream: _Upstream) -> bool:
        """One absolute-URI request on the kept-alive upstream (or a new one); True to keep the client."""
        host, port, path = http.absolute_target(req)
        add = self._mesh_header(req, host, port)
        for attempt in range(2):
            reused = upstream.usable_for((host, port))
            if not reused:
                await upstream.close()
                upstream.streams = await self._dial_http(host, port)
                upstream.key = (host, port)
            assert upstream.streams is not None
            try:
                result = await self._exchange(req, path, host, port, reader, writer, upstream.streams,
                                              retry_ok=reused and attempt == 0, add=add)
            except _Stale:
                log.debug("kept-alive upstream %s:%s had closed; sending the request again", host, port)
                await upstream.close()
                continue
            if result is None:  # switched protocols: a raw stream from now on
                up_reader, up_writer = upstream.streams
                upstream.streams = None
                await self._tunnel(f"HTTP upgrade {host}:{port}", reader, writer, up_reader, up_writer)
                return False
            keep_client, keep_upstream = result
            if not keep_upstream:  # the next request, if any, dials again
                await upstream.close()
            return keep_client
        raise AssertionError("unreachable: the second attempt never raises _Stale")

    def _mesh_header(self, req: http1.Request, host: str, port: int) -> tuple[str, str] | None:
        """The mesh header to add for host:port, unless the client chose its own value (or none applies).
        Only here, in absolute-URI forwarding: CONNECT and SOCKS carry bytes the proxy cannot edit."""
        if self.marks is None:
            return None
        found = self.marks.header_for(host, port)
        return None if found is None or req.get(found[0]) is not None else found

    async def _exchange(self, req: http1.Request, path: str, host: str, port: int,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Streams,
                        retry_ok: bool, add: tuple[str, str] | None = None) -> tuple[bool, bool] | None:
        """One request/response: (keep the client, keep the upstream), or None after a 101."""
        up_reader, up_writer = upstream
        req_len = http1.body_length(req, is_response=False)
        head_sent = False
        try:
            async with Idle(EXCHANGE_IDLE_TIMEOUT) as idle:
                body_up, client = Touching(up_writer, idle), Touching(writer, idle)
                up_writer.write(http.upstream_head(req, path, host, port, add))
                # The body goes up while the response is awaited: a client waiting for "100 Continue"
                # and an origin answering early both work. Whichever fails first decides.
                body = aio.create_task(http1.copy_body(reader, body_up, req_len, status=400))
                head = aio.create_task(self._final_head(up_reader, client, idle))
                try:
                    try:
                        resp = await self._race(body, head, reader)
                    except (http1.EmptyResponse, ConnectionResetError, BrokenPipeError) as exc:
                        if (retry_ok and body_up.written == 0 and client.written == 0
                                and req.method in IDEMPOTENT):
                            raise _Stale from exc
                        raise
                    resp_len = http1.body_length(resp, is_response=True, request_method=req.method)
                    keep_client = req.keep_alive() and resp_len is not None
                    head_sent = True
                    try:
                        if resp.status == 101:
                            writer.write(http1.response_head(resp, True))
                            await body
                            return None
                        writer.write(http1.response_head(resp, keep_client))
                        await http1.copy_body(up_reader, client, resp_len, status=502)
                        await body  # the whole request body is read before the next request's head
                    except Exception as exc:  # the client has a head: an error page now would corrupt the body
                        raise _MidResponse(str(exc) or type(exc).__name__) from exc
                    return keep_client, resp.keep_alive() and resp_len is not None
                finally:
                    for task in (body, head):
                        await _cancelled(task)
        except TimeoutError as exc:
            if head_sent:
                raise _MidResponse(f"nothing moved for {EXCHANGE_IDLE_TIMEOUT:g} s") from exc
            raise http1.HTTPError(504, f"{host}:{port} sent no response for {EXCHANGE_IDLE_TIMEOUT:g} s") from exc

    @staticmethod
    async def _race(body: asyncio.Future[None], head: asyncio.Future[http1.Response],
                    client: asyncio.StreamReader) -> http1.Response:
        """The final response head; a request body that fails first ends the exchange instead."""
        pending: set[asyncio.Future[Any]] = {body, head}
        while not head.done():
            done, pending = await aio.wait_first(pending)
            failed = body.exception() if body in done else None
            # Bad framing or a client gone mid-body: the origin waits for the rest for ever.
            if isinstance(failed, http1.HTTPError) or (failed and client.exception() is not None):
                raise failed
            # Otherwise the upstream stopped taking the body: its answer, if any, says why.
        return head.result()

    @staticmethod
    async def _final_head(up_reader: Any, client: Touching, idle: Idle) -> http1.Response:
        """The final response head; interim ones (100 Continue, 103 Early Hints) go to the client at once."""
        while True:
            resp = await http1.read_response(up_reader)
            idle.touch()
            if not (100 <= resp.status < 200) or resp.status == 101:
                return resp
            client.write(http1.response_head(resp, True))
            await client.drain()

    async def _http_local_or_connect(self, req: http1.Request, reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
        if req.method != "CONNECT":
            await self._http_local(req, writer)
            return
        if not http.check_proxy_auth(req, self.credentials):
            writer.write(self._auth_required())
            return
        host, port = http1.split_authority(req.target, 443)
        up_reader, up_writer = await self._dial("CONNECT", host, port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await self._tunnel(f"CONNECT {host}:{port}", reader, writer, up_reader, up_writer)

    async def _http_local(self, req: http1.Request, writer: asyncio.StreamWriter) -> None:
        """Origin-form: a request for this server itself (the PAC file)."""
        if req.target.split("?", 1)[0] != "/proxy.pac" or not self.pac or req.method not in ("GET", "HEAD"):
            writer.write(http1.simple_response(404, "ktproxy: this is a proxy; the PAC file is /proxy.pac\n"))
            return
        peer = writer.get_extra_info("peername") or ("",)
        local = writer.get_extra_info("sockname") or ("",)
        refused = http.pac_access(req, str(peer[0]), {str(local[0]), self._bind_host}, self.credentials)
        if refused is not None:
            log.info("PAC file refused to %s (Host %r): %s", peer[0], req.get("host"), refused)
            headers = [("WWW-Authenticate", 'Basic realm="ktproxy"')] if refused == 401 else []
            writer.write(http1.simple_response(refused, "ktproxy: not for you\n", headers=headers))
            return
        resp = http1.simple_response(200, self.pac(), content_type=PAC_TYPE, headers=[("Cache-Control", "no-store")])
        if req.method == "HEAD":
            resp = resp[: resp.index(b"\r\n\r\n") + 4]
        writer.write(resp)
        await writer.drain()

    @staticmethod
    def _auth_required() -> bytes:
        return http1.simple_response(407, "ktproxy: proxy authentication required\n",
                                     headers=[("Proxy-Authenticate", 'Basic realm="ktproxy"')])


async def _cancelled(task: asyncio.Future[Any]) -> None:
    """Stop `task` if it still runs and collect its outcome, so no exception goes unretrieved.
    (asyncio.wait, unlike awaiting the task, lets a cancellation of the caller through.)"""
    if not task.done():
        task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()
