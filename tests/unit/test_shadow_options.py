"""The shadow's flags: --expose, --health-port, and --listen's dual-stack default."""

from __future__ import annotations

import pytest

from shadow_image.options import parse_args


def test_defaults_listen_on_every_address_and_expose_nothing() -> None:
    opts = parse_args([])
    assert (opts.listen_host, opts.listen_port) == ("", 2222)  # "" = dual stack (S1: IPv6-only clusters)
    assert opts.expose == () and opts.health_port is None


def test_expose_takes_lists_and_repeats_and_drops_duplicates() -> None:
    opts = parse_args(["--expose", "8080,9090", "--expose", "80", "--expose", "8080", "--health-port", "8081"])
    assert opts.expose == (8080, 9090, 80)
    assert opts.health_port == 8081


@pytest.mark.parametrize("listen,host", [("[::]:2222", "::"), ("127.0.0.1:0", "127.0.0.1"), (":2222", "")])
def test_listen_forms(listen: str, host: str) -> None:
    assert parse_args(["--listen", listen]).listen_host == host


@pytest.mark.parametrize("argv", [
    ["--expose", "0"], ["--expose", "65536"], ["--expose", "80,"], ["--expose", "http"],
    ["--health-port", "0"], ["--expose", "2222"], ["--expose", "8080", "--health-port", "8080"],
    ["--health-port", "2222"], ["--listen", "::1:22"],
])
def test_bad_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "shadow_image: error:" in capsys.readouterr().err
