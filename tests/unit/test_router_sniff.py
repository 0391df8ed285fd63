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


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00", b"SSH-2.0-OpenSSH\r\n", b"get / HTTP/1.1",
                                  b"FOO / HTTP/1.1", b"PRI * HTTP/1.1\r\n", b"\x00", b"*1\r\n$4\r\nPING\r\n",
                                  b"GETX / HTTP/1.1", b"A" * 30])
def test_anything_else_is_raw(data):
    assert sniff.classify(data) == sniff.RAW


@pytest.mark.parametrize("method", sorted(sniff.METHODS))
def test_every_sniffed_method_is_one_llhttp_parses(method):
    seen = []

    class P:
        def on_headers_complete(self) -> None:
            seen.append(parser.get_method())

    parser = httptools.HttpRequestParser(P())
    parser.feed_data(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert seen == [method]
