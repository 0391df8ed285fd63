"""Protocol sniffing: HTTP/2's preface (even in pieces), HTTP/1 methods llhttp parses, anything else raw."""

from __future__ import annotations

import httptools
import pytest

from shadow_image.router import sniff


@pytest.mark.parametrize("n", range(24))
def test_a_prefix_of_the_http2_preface_waits_for_more(n):
    assert sniff.classify(sniff.H2_PREFACE[:n]) is None


def test_http2_preface_whole_or_with_frames_after_it():
    assert sniff.classify(sniff.H2_PREFACE) == sniff.H2
    assert sniff.classify(sniff.H2_PREFACE + b"\x00\x00\x00\x04\x00") == sniff.H2


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"M-SEARCH * HTTP/1.1",
                                  b"PROPFIND /x HTTP/1.1", b"DELETE "])
def test_http1(data):
    assert sniff.classify(data) == sniff.H1


@pytest.mark.parametrize("data", [b"G", b"GE", b"GET", b"PROPFI", b"M-"])
def test_a_method_prefix_waits(data):
    assert sniff.classify(data) is None


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00", b"SSH-2.0-OpenSSH\r\n", b"\x00", b"*1\r\n$4\r\nPING\r\n",
                                  b"A" * 40, b"SET key value\r\n", b"EHLO mail.example\r\n", b"FOO /x HTTP/1.12\r\n",
                                  b"FOO /x HTTP/a.1\r\n", b"FOO /x HTTP/1.1 x\r\n", b"FOO  HTTP/1.1\r\n",
                                  b"\r\n\r\nGET / HTTP/1.1\r\n", b"GET\t/ HTTP/1.1\r\n", b"1GET / HTTP/1.1\r\n",
                                  b"A" * 33 + b" / HTTP/1.1\r\n", b"FOO " + b"x" * 17000])
def test_anything_else_is_raw(data):
    assert sniff.classify(data) == sniff.RAW


@pytest.mark.parametrize(("data", "kind"), [
    (b"bad_method\x01 /x HTTP/1.1\r\n", sniff.BAD),  # used to reach the original pods verbatim
    (b"G\xc3\xa9T /x HTTP/1.1\r\n", sniff.BAD),
    (b"FOO / HTTP/1.1\n", sniff.BAD),
    (b"FOO / HTTP/1.1\r\n", sniff.NOT_IMPLEMENTED),
    (b"get / HTTP/1.1\r\nHost: a\r\n", sniff.NOT_IMPLEMENTED),
    (b"GETX /x HTTP/1.0\r\n", sniff.NOT_IMPLEMENTED),
    (b"PRI * HTTP/1.1\r\n", sniff.NOT_IMPLEMENTED),
    (b"\r\nFOO / HTTP/1.1\r\n", sniff.NOT_IMPLEMENTED),
])
def test_an_http_shaped_request_line_the_router_cannot_parse_is_refused(data, kind):
    assert sniff.classify(data) == kind
    for n in range(1, len(data)):  # in pieces: waits, never decides otherwise
        assert sniff.classify(data[:n]) in (None, kind), data[:n]


@pytest.mark.parametrize("data", [b"\r\nGET / HTTP/1.1\r\n", b"\nGET / HTTP/1.1\r\n", b"\r\nDELETE "])
def test_one_empty_line_before_the_request_line_is_ignored(data):
    assert sniff.classify(data) == sniff.H1
    assert sniff.classify(b"\r") is None and sniff.classify(b"\r\n") is None


@pytest.mark.parametrize("method", sorted(sniff.METHODS))
def test_every_sniffed_method_is_one_llhttp_parses(method):
    seen = []

    class P:
        def on_headers_complete(self) -> None:
            seen.append(parser.get_method())

    parser = httptools.HttpRequestParser(P())
    parser.feed_data(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert seen == [method]
