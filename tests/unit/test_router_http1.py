"""The router's HTTP/1 decisions without sockets: which requests are refused, the head sent upstream (Host
kept, hop-by-hop fields gone, X-Forwarded-For appended, framing the router's own), the head sent back and
how the response body is framed for the client."""

from __future__ import annotations

import pytest

from shadow_image.router import http1
from shadow_image.router.http1 import BadRequest, prepare_request, prepare_response


def _req(headers: list[tuple[bytes, bytes]], *, version: str = "1.1", method: bytes = b"GET",
         upgrade: bool = False) -> tuple[bytes, int, bool]:
    return prepare_request(method, b"/p?q=1", version, headers, b"10.0.0.7", upgrade)


def _lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def test_request_head_keeps_host_and_end_to_end_fields_and_appends_the_client():
    head, framing, upgrade = _req([(b"Host", b"tomcat:8080"), (b"VERSION", b"abcde"), (b"Accept", b"*/*"),
                                   (b"X-Forwarded-For", b"1.2.3.4")])
    assert _lines(head) == [b"GET /p?q=1 HTTP/1.1", b"Host: tomcat:8080", b"VERSION: abcde", b"Accept: */*",
                            b"X-Forwarded-For: 1.2.3.4, 10.0.0.7"]
    assert (framing, upgrade) == (http1.NO_BODY, False)


def test_several_x_forwarded_for_fields_become_one_list():
    head, _, _ = _req([(b"Host", b"a"), (b"x-forwarded-for", b"1.1.1.1"), (b"X-Forwarded-For", b"2.2.2.2")])
    assert b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.7" in _lines(head)
    assert head.lower().count(b"x-forwarded-for") == 1


def test_hop_by_hop_fields_and_those_named_in_connection_are_dropped():
    head, _, _ = _req([(b"X-Secret", b"1"), (b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret"),
                       (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Proxy-Connection", b"keep-alive"),
                       (b"Upgrade", b"foo"), (b"X-Kept", b"2"), (b"Content-Length", b"0")])
    assert _lines(head) == [b"GET /p?q=1 HTTP/1.1", b"Host: a", b"X-Kept: 2", b"Content-Length: 0",
                            b"X-Forwarded-For: 10.0.0.7"]
    head, _, _ = _req([(b"Host", b"a"), (b"Content-Length", b"0"), (b"Connection", b"keep-alive")])
    assert _lines(head) == [b"GET /p?q=1 HTTP/1.1", b"Host: a", b"Content-Length: 0", b"X-Forwarded-For: 10.0.0.7"]


@pytest.mark.parametrize("name", [b"Transfer_Encoding", b"Content_Length", b"X_Forwarded_For", b"Transfer--Encoding",
                                  b"Transfer---Encoding", b"-Content-Length", b"Content-Length-", b"x_dev"])
def test_look_alike_field_names_are_not_forwarded(name):
    """A server that folds `_` into `-` (CGI, WSGI) would read Transfer_Encoding as framing."""
    for conn in ([], [(b"Connection", b"x-named")]):  # the second pass too
        head, framing, _ = _req([(b"Host", b"a"), (name, b"chunked"), (b"X-Kept", b"1"), *conn], method=b"POST")
        assert _lines(head) == [b"POST /p?q=1 HTTP/1.1", b"Host: a", b"X-Kept: 1", b"X-Forwarded-For: 10.0.0.7"]
        assert framing == http1.NO_BODY


def test_http10_request_goes_upstream_as_http11_so_the_connection_can_be_pooled():
    head, _, _ = _req([], version="1.0")
    assert _lines(head)[0] == b"GET /p?q=1 HTTP/1.1"


def test_chunked_request_is_re_framed_by_the_router():
    head, framing, _ = _req([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], method=b"POST")
    assert framing == http1.CHUNKED
    assert _lines(head)[-1] == b"Transfer-Encoding: chunked"
    assert head.lower().count(b"transfer-encoding") == 1


def test_content_length_is_kept_as_a_plain_number_and_zero_means_no_body():
    head, framing, _ = _req([(b"Host", b"a"), (b"content-length", b" 005")], method=b"POST")
    assert framing == http1.LENGTH and b"Content-Length: 5" in _lines(head)
    assert head.lower().count(b"content-length") == 1
    assert _req([(b"Host", b"a"), (b"Content-Length", b"0")], method=b"POST")[1] == http1.NO_BODY


WS = [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket"), (b"Sec-WebSocket-Key", b"k"),
      (b"Sec-WebSocket-Version", b"13")]


def test_websocket_upgrade_keeps_upgrade_and_says_connection_upgrade():
    head, _, upgrade = _req(WS, upgrade=True)
    assert upgrade
    assert _lines(head)[1:] == [b"Host: a", b"Sec-WebSocket-Key: k", b"Sec-WebSocket-Version: 13",
                                b"X-Forwarded-For: 10.0.0.7", b"Upgrade: websocket", b"Connection: upgrade"]


@pytest.mark.parametrize(("headers", "kw"), [
    ([*WS[:2], (b"Upgrade", b"h2c, websocket"), *WS[3:]], {}),
    ([*WS[:2], (b"Upgrade", b"websocket, h2c"), *WS[3:]], {}),
    ([*WS[:2], (b"Upgrade", b"websocket"), (b"Upgrade", b"websocket"), *WS[3:]], {}),
    ([*WS[:2], (b"Upgrade", b"websocket/13"), *WS[3:]], {}),
    ([*WS[:2], (b"Upgrade", b"foo"), *WS[3:]], {}),
    (WS[:4], {}),  # no Sec-WebSocket-Version
    ([*WS[:3], WS[4]], {}),  # no Sec-WebSocket-Key
    (WS, {"method": b"OPTIONS"}),
    (WS, {"version": "1.0"}),
])
def test_only_a_plain_websocket_handshake_is_a_protocol_switch(headers, kw):
    """Anything else is plain HTTP/1.1 without the upgrade fields, so the connection is never spliced and
    every later request on it is routed on its own."""
    head, _, upgrade = _req(headers, upgrade=True, **kw)
    assert not upgrade
    assert b"upgrade" not in head.lower().replace(b"sec-websocket", b"")


def test_h2c_upgrade_on_cleartext_is_served_as_plain_http11():
    head, _, upgrade = _req([(b"Host", b"a"), (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
                             (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA")], upgrade=True)
    assert not upgrade
    assert _lines(head)[1:] == [b"Host: a", b"X-Forwarded-For: 10.0.0.7"]


@pytest.mark.parametrize(("protocol", "framing", "reason"), [
    (b"h2c", (b"Content-Length", b"52"), "Upgrade: h2c with a body"),
    (b"h2c", (b"Transfer-Encoding", b"chunked"), "Upgrade: h2c with a body"),
    (b"websocket", (b"Content-Length", b"3"), "an Upgrade request with a body"),
])
def test_a_protocol_switch_request_with_a_body_is_refused(protocol, framing, reason):
    # llhttp ends such a request at its head: its body would be read as the next request.
    with pytest.raises(BadRequest, match=reason):
        _req([(b"Host", b"a"), (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", protocol), framing],
             method=b"POST", upgrade=True)
    _, framing_got, _ = _req([(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", protocol),
                              (b"Content-Length", b"0")], method=b"POST", upgrade=True)
    assert framing_got == http1.NO_BODY


@pytest.mark.parametrize(("headers", "version", "reason"), [
    ([], "1.1", "Host"),
    ([(b"Host", b"a"), (b"Host", b"b")], "1.1", "Host"),
    ([(b"Host", b"a"), (b"Host", b"a")], "1.0", "Host"),
    ([(b"Host", b"a")], "2.0", "HTTP/2.0"),
    ([(b"Host", b"a")], "0.9", "HTTP/0.9"),
    ([(b"Host", b"a"), (b"Content-Length", b"1"), (b"Content-Length", b"2")], "1.1", "Content-Length"),
    ([(b"Host", b"a"), (b"Content-Length", b"1"), (b"Content-Length", b"1")], "1.1", "Content-Length"),
    ([(b"Host", b"a"), (b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")], "1.1", "both"),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], "1.0", "HTTP/1.0"),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], "1.1", "chunked"),
    ([(b"Host", b"a"), (b"Content-Length", b"-1")], "1.1", "Content-Length"),
    ([(b"Host", b"a"), (b"Content-Length", b"1" * 19)], "1.1", "Content-Length"),
])
def test_ambiguous_or_unsupported_requests_are_refused(headers, version, reason):
    with pytest.raises(BadRequest, match=reason):
        _req(headers, version=version, method=b"POST")


@pytest.mark.parametrize(("te", "status"), [
    ([b"gzip, chunked"], 501), ([b"gzip", b"chunked"], 501), ([b"x-custom ,Chunked"], 501),  # valid, unimplemented
    ([b"chunked, gzip"], 400), ([b"gzip"], 400), ([b"chunked, chunked"], 400), ([b"chunked", b"chunked"], 400),
    ([b"gzip;q=1, chunked"], 400), ([b", chunked"], 400),
])
def test_transfer_codings_other_than_chunked_are_refused_501_when_valid_400_when_not(te, status):
    """RFC 9112 6.1: a coding the server does not implement gets 501; 6.3: a request whose final coding is
    not chunked is malformed (400). Relaying them would mean forwarding a coding the router cannot frame."""
    with pytest.raises(BadRequest, match="other than chunked") as err:
        _req([(b"Host", b"a"), *((b"Transfer-Encoding", v) for v in te)], method=b"POST")
    assert err.value.status == status


def test_http10_needs_no_host_but_gets_the_services_name_upstream():
    head, _framing, _ = prepare_request(b"GET", b"/", "1.0", [], b"10.0.0.7", False, b"tomcat")
    assert _lines(head) == [b"GET / HTTP/1.1", b"Host: tomcat", b"X-Forwarded-For: 10.0.0.7"]


def test_trailers_travel_except_framing_fields():
    end = http1.format_trailers([(b"X-Sum", b"3"), (b"Content-Length", b"9"), (b"Transfer-Encoding", b"x"),
                                 (b"grpc-status", b"0")])
    assert end == b"0\r\nX-Sum: 3\r\ngrpc-status: 0\r\n\r\n"
    assert http1.format_trailers([]) == b"0\r\n\r\n"


def _resp(status: int, headers: list[tuple[bytes, bytes]], *, http11: bool = True, head: bool = False,
          keep: bool = True) -> tuple[list[bytes], int, bool]:
    out, mode, close = prepare_response(status, b"OK", headers, client_http11=http11, head_request=head,
                                        client_keep_alive=keep)
    return _lines(out), mode, close


def test_response_with_length_passes_raw_and_keeps_the_connection():
    lines, mode, close = _resp(200, [(b"Content-Length", b"5"), (b"Connection", b"keep-alive"),
                                     (b"Keep-Alive", b"timeout=5")])
    assert (lines, mode, close) == ([b"HTTP/1.1 200 OK", b"Content-Length: 5"], http1.RESP_RAW, False)


def test_chunked_response_is_re_chunked_for_http11_and_delimited_by_close_for_http10():
    lines, mode, close = _resp(200, [(b"Transfer-Encoding", b"chunked")])
    assert (lines, mode, close) == ([b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"], http1.RESP_CHUNKED, False)
    lines, mode, close = _resp(200, [(b"Transfer-Encoding", b"chunked")], http11=False)
    assert (lines, mode, close) == ([b"HTTP/1.1 200 OK", b"Connection: close"], http1.RESP_RAW, True)


def test_response_without_length_is_delimited_by_close():
    lines, mode, close = _resp(200, [(b"Content-Type", b"text/plain")])
    assert (lines, mode, close) == ([b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Connection: close"],
                                    http1.RESP_EOF, True)
    lines, mode, close = _resp(200, [(b"Transfer-Encoding", b"gzip")])
    assert (lines[1], mode, close) == (b"Transfer-Encoding: gzip", http1.RESP_EOF, True)
    lines, mode, close = _resp(200, [(b"Transfer-Encoding", b"gzip, chunked")])
    assert (lines[1], mode, close) == (b"Transfer-Encoding: gzip, chunked", http1.RESP_CHUNKED, False)
    assert _resp(200, [(b"content-length", b"0")])[1:] == (http1.RESP_RAW, False)


def test_fields_an_upstream_names_in_connection_stay_behind():
    lines, _, _ = _resp(200, [(b"X-Hop", b"1"), (b"Content-Length", b"1"), (b"Connection", b"x-hop, close"),
                              (b"X-Kept", b"2")])
    assert lines == [b"HTTP/1.1 200 OK", b"Content-Length: 1", b"X-Kept: 2"]


def test_response_field_kinds_and_status_lines_are_the_same_once_cached():
    """prepare_response remembers what each field name (as spelled) is and each status line: the answer for a
    name or status seen before is the one computed the first time, whatever the spelling."""
    http1._RESP_KINDS.clear()
    http1._STATUS_LINES.clear()
    headers = [(b"CONTENT-length", b"5"), (b"connection", b"Keep-Alive"), (b"KEEP-ALIVE", b"timeout=5"),
               (b"X-Transfer-Encoding", b"gzip"), (b"Te", b"trailers"), (b"Proxy-Connection", b"x"),
               (b"Upgrade", b"h2c"), (b"Content-Type", b"text/plain")]
    first = [prepare_response(status, reason, headers, client_http11=True, head_request=False,
                              client_keep_alive=True) for status, reason in ((200, b"OK"), (200, b"Fine"))]
    assert b"CONTENT-length" in http1._RESP_KINDS and (200, b"OK") in http1._STATUS_LINES
    again = [prepare_response(status, reason, headers, client_http11=True, head_request=False,
                              client_keep_alive=True) for status, reason in ((200, b"OK"), (200, b"Fine"))]
    assert first == again
    assert _lines(again[0][0]) == [b"HTTP/1.1 200 OK", b"CONTENT-length: 5", b"X-Transfer-Encoding: gzip",
                                   b"Content-Type: text/plain"]
    assert _lines(again[1][0])[0] == b"HTTP/1.1 200 Fine" and again[0][1:] == (http1.RESP_RAW, False)
    chunked = [(b"TRANSFER-ENCODING", b"chunked"), (b"Connection", b"x-hop"), (b"X-Hop", b"1")]
    for _ in range(2):
        out, mode, close = prepare_response(200, b"OK", chunked, client_http11=True, head_request=False,
                                            client_keep_alive=True)
        assert _lines(out) == [b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"]
        assert (mode, close) == (http1.RESP_CHUNKED, False)


@pytest.mark.parametrize(("status", "head"), [(204, False), (304, False), (200, True)])
def test_no_body_answers_whatever_their_headers_say(status, head):
    lines, mode, close = _resp(status, [(b"Content-Length", b"100"), (b"Transfer-Encoding", b"chunked")],
                               head=head)
    assert mode == http1.RESP_NONE and not close
    assert b"Content-Length: 100" in lines  # a HEAD answer still tells the GET's length


def test_http10_client_that_asked_for_keep_alive_is_told_so_and_a_closing_one_gets_close():
    lines, _, close = _resp(200, [(b"Content-Length", b"1")], http11=False)
    assert lines[-1] == b"Connection: keep-alive" and not close
    lines, _, close = _resp(200, [(b"Content-Length", b"1")], keep=False)
    assert lines[-1] == b"Connection: close" and close


def test_interim_and_switching_answers_go_verbatim():
    lines, mode, close = _resp(101, [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")])
    assert lines == [b"HTTP/1.1 101 OK", b"Upgrade: websocket", b"Connection: Upgrade"]
    assert (mode, close) == (http1.RESP_NONE, False)
    assert _resp(103, [(b"Link", b"</a>")])[0] == [b"HTTP/1.1 103 OK", b"Link: </a>"]


def test_upstream_keep_alive_rule_for_head_answers():
    assert http1.keep_alive("1.1", [])
    assert not http1.keep_alive("1.1", [(b"Connection", b"close")])
    assert not http1.keep_alive("1.0", [])
    assert http1.keep_alive("1.0", [(b"connection", b"Keep-Alive")])


def test_error_response_is_well_framed():
    out = http1.error_response(502, "ktproxy mesh: route 'VERSION: abcde' (x:1) is unreachable: refused", close=True)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Length: %d" % len(body) in head and b"Connection: close" in head
    assert body == b"ktproxy mesh: route 'VERSION: abcde' (x:1) is unreachable: refused\n"


@pytest.mark.parametrize(("peer", "addr"), [(("::ffff:10.1.2.3", 5, 0, 0), b"10.1.2.3"),
                                            (("fd00::1", 5, 0, 0), b"fd00::1"), (("127.0.0.1", 5), b"127.0.0.1"),
                                            (None, b"unknown")])
def test_client_address(peer, addr):
    assert http1.client_address(peer) == addr


@pytest.mark.parametrize(("tail", "data", "heads", "clean"), [
    (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 1, True),
    (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray", 1, False),
    (b"", b"HTTP/1.1 200 OK\r\n\r\n\r\n", 1, False),
    (b"", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA: 1\r\n\r\n", 2, True),
    (b"", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA: 1\r\n\r\nHTTP", 2, False),
    (b"1\r\n", b"\r\n", 1, True),  # the blank line split between two reads
    (b"1\r\n", b"\r\nx", 1, False),
])
def test_a_head_answer_is_reusable_only_when_nothing_followed_its_head(tail, data, heads, clean):
    from shadow_image.router.upstream import UpstreamConnection

    conn = UpstreamConnection(None, ("a", 1))  # type: ignore[arg-type]
    conn._tail, conn._heads = tail, heads
    assert conn._nothing_after_heads(data) is clean
