"""The local proxy port: SOCKS5, SOCKS4a, HTTP CONNECT, absolute-URI HTTP and the PAC file, on one port.

The first byte picks the protocol (0x05 SOCKS5, 0x04 SOCKS4, a letter HTTP). Each connection is
handled in its own task; a malformed request gets its protocol's error reply and a closed
connection, and never disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ktproxy.pac import CONTENT_TYPE as PAC_TYPE
from ktproxy.proxy import http, socks
from ktproxy.proxy.dialer import Dialer, DialError, set_nodelay
from ktproxy.proxy.relay import relay

log = logging.getLogger("ktproxy.proxy")

HTTP_DIAL_STATUS = {"timeout": 504}
HANDSHAKE_TIMEOUT = 30.0


class _MidResponse(ConnectionError):
    """The upstream broke a response after its head was relayed: the only honest signal is to close."""


class ProxyServer:
    def __init__(self, dialer: Dialer, pac: Callable[[], str] | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        self.dialer = dialer
        self.pac = pac
        self.credentials = credentials
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self._closing = False

    async def start(self, host: str = "127.0.0.1", port: int = 2223) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, limit=http.MAX_HEAD + 1024)

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
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.active += 1
        set_nodelay(writer)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
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
            first = await asyncio.wait_for(reader.readexactly(1), HANDSHAKE_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError):
            return
        if first[0] == socks.SOCKS5:
            await self._socks5(reader, writer)
        elif first[0] == socks.SOCKS4:
            await self._socks4(reader, writer)
        elif first.isalpha():
            await self._http(reader, writer, first)
        else:
            log.debug("unknown protocol byte %r", first)

    # -- SOCKS ----------------------------------------------------------------------------------
    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            methods = await asyncio.wait_for(socks.read_socks5_greeting(reader), HANDSHAKE_TIMEOUT)
            wanted = socks.METHOD_USERPASS if self.credentials else socks.METHOD_NONE
            if wanted not in methods:
                writer.write(bytes([socks.SOCKS5, socks.METHOD_UNACCEPTABLE]))
                return
            writer.write(bytes([socks.SOCKS5, wanted]))
            if self.credentials:
                ok = await socks.read_userpass(reader) == self.credentials
                writer.write(bytes([0x01, 0x00 if ok else 0x01]))
                if not ok:
                    return
            req = await asyncio.wait_for(socks.read_socks5_request(reader), HANDSHAKE_TIMEOUT)
        except socks.SocksError as exc:
            log.info("bad SOCKS5 request: %s", exc)
            if exc.reply is not None:
                writer.write(socks.socks5_reply(exc.reply))
            return
        except TimeoutError:
            return
        try:
            up_reader, up_writer = await self.dialer.dial(req.host, req.port)
        except DialError as exc:
            log.info("SOCKS5 %s:%s: %s", req.host, req.port, exc)
            writer.write(socks.socks5_reply(socks.DIAL_ERROR_REPLY[exc.kind]))
            return
        writer.write(socks.socks5_reply(socks.REP_OK))
        await relay(reader, writer, up_reader, up_writer)

    async def _socks4(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.credentials:  # SOCKS4 has no passwords; refuse rather than bypass authentication
            writer.write(socks.socks4_reply(False))
            return
        try:
            req = await asyncio.wait_for(socks.read_socks4_request(reader), HANDSHAKE_TIMEOUT)
        except (TimeoutError, socks.SocksError) as exc:
            log.info("bad SOCKS4 request: %s", exc)
            writer.write(socks.socks4_reply(False))
            return
        try:
            up_reader, up_writer = await self.dialer.dial(req.host, req.port)
        except DialError as exc:
            log.info("SOCKS4 %s:%s: %s", req.host, req.port, exc)
            writer.write(socks.socks4_reply(False))
            return
        writer.write(socks.socks4_reply(True))
        await relay(reader, writer, up_reader, up_writer)

    # -- HTTP -----------------------------------------------------------------------------------
    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        upstream_key: tuple[str, int] | None = None
        try:
            req = await asyncio.wait_for(http.read_request(reader, first), HANDSHAKE_TIMEOUT)
            while req is not None:
                if req.method == "CONNECT" or req.target.startswith("/"):
                    await self._http_local_or_connect(req, reader, writer)
                    return
                if not http.check_proxy_auth(req, self.credentials):
                    writer.write(self._auth_required())
                    return
                host, port, path = http.absolute_target(req)
                if upstream is None or upstream_key != (host, port) or upstream[0].at_eof():
                    await http.close_quietly(upstream[1] if upstream else None)
                    upstream = await self._dial_http(host, port)
                    upstream_key = (host, port)
                keep = await self._exchange(req, path, host, port, reader, writer, upstream)
                if not keep:  # None: switched protocols, the relay has finished the connection
                    return
                req = await http.read_request(reader)
        except http.HTTPError as exc:
            log.info("HTTP proxy: %s", exc)
            with contextlib.suppress(Exception):
                writer.write(http.simple_response(exc.status, f"ktproxy: {exc}\n"))
        except DialError as exc:
            log.info("HTTP proxy: %s", exc)
            status = HTTP_DIAL_STATUS.get(exc.kind, 502)
            with contextlib.suppress(Exception):
                writer.write(http.simple_response(status, f"ktproxy: {exc}\n"))
        except TimeoutError:
            return
        finally:
            await http.close_quietly(upstream[1] if upstream else None)

    async def _dial_http(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.dialer.dial(host, port)

    async def _exchange(self, req: http.Request, path: str, host: str, port: int,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool | None:
        """One request/response; True to keep the client connection, None after an upgrade."""
        up_reader, up_writer = upstream
        req_len = http.body_length(req, is_response=False)
        up_writer.write(http.upstream_head(req, path, host, port))
        # The body goes up concurrently with reading the response: a client waiting for
        # "100 Continue" and a server answering early must both work.
        body_task = asyncio.ensure_future(http.copy_body(reader, up_writer, req_len))
        try:
            while True:
                resp = await http.read_response(up_reader)
                if 100 <= resp.status < 200 and resp.status != 101:
                    writer.write(http.response_head(resp, True))
                    await writer.drain()
                    continue
                break
            if resp.status == 101:
                writer.write(http.response_head(resp, True))
                await body_task
                await relay(reader, writer, up_reader, up_writer)
                return None
            resp_len = http.body_length(resp, is_response=True, request_method=req.method)
            upstream_keeps = "close" not in resp.tokens("connection") and (
                resp.start[0] != "HTTP/1.0" or "keep-alive" in resp.tokens("connection"))
            keep = req.keep_alive() and resp_len is not None and upstream_keeps
            writer.write(http.response_head(resp, keep))
            try:
                await http.copy_body(up_reader, writer, resp_len)
            except http.HTTPError as exc:
                # The client already has a response head: an error page now would corrupt the body.
                raise _MidResponse(str(exc)) from exc
            await body_task
            return keep
        finally:
            if not body_task.done():
                body_task.cancel()
                with contextlib.suppress(BaseException):
                    await body_task

    async def _http_local_or_connect(self, req: http.Request, reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
        if req.method != "CONNECT":
            # Origin-form: a request for this server itself (the PAC file).
            if req.target.split("?", 1)[0] == "/proxy.pac" and self.pac and req.method in ("GET", "HEAD"):
                body = self.pac()
                resp = http.simple_response(200, body, content_type=PAC_TYPE,
                                            headers=[("Cache-Control", "no-store")])
                if req.method == "HEAD":
                    resp = resp[: resp.index(b"\r\n\r\n") + 4]
                writer.write(resp)
                await writer.drain()
                return
            writer.write(http.simple_response(404, "ktproxy: this is a proxy; the PAC file is /proxy.pac\n"))
            return
        if not http.check_proxy_auth(req, self.credentials):
            writer.write(self._auth_required())
            return
        host, port = http.split_authority(req.target, 443)
        up_reader, up_writer = await self.dialer.dial(host, port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await relay(reader, writer, up_reader, up_writer)

    @staticmethod
    def _auth_required() -> bytes:
        return http.simple_response(407, "ktproxy: proxy authentication required\n",
                                    headers=[("Proxy-Authenticate", 'Basic realm="ktproxy"')])
