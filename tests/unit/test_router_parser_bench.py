"""benchmarks/router_parser.py runs and decides what it claims: both parsers see the same complete
requests (a parser that skipped work would look fast)."""

from __future__ import annotations

from benchmarks import router_parser


def test_every_parser_completes_every_case():
    for data in router_parser.CASES.values():
        for fn in router_parser.PARSERS.values():
            assert fn(data, 3) == 3


def test_httptools_collects_what_the_router_needs():
    sink = router_parser._Collect()
    parser = router_parser.httptools.HttpRequestParser(sink)
    parser.feed_data(router_parser.CHUNKED_POST)
    assert sink.url == b"/upload" and b"".join(sink.body) == b"y" * 1024 + b"z" * 1024
    assert (b"Transfer-Encoding", b"chunked") in sink.headers


def test_report(tmp_path):
    out = tmp_path / "r.md"
    assert router_parser.main(["--seconds", "0.03", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("\n| ") == 2 + len(router_parser.CASES) - 1 and "Result: httptools parses" in text
