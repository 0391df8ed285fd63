"""All-addresses listeners are dual stack: one socket with IPV6_V6ONLY off, or a v6 + v4 pair."""

from __future__ import annotations

import socket

import pytest

from shadow_image import listeners


def _reachable(port: int, host: str) -> bool:
    with socket.create_connection((host, port), timeout=2):
        return True


def _listening(socks: list[socket.socket]) -> int:
    for s in socks:
        s.listen()
    return socks[0].getsockname()[1]


def _families_of_a_dual_stack_listener(socks: list[socket.socket]) -> list[socket.AddressFamily]:
    try:
        port = _listening(socks)
        assert _reachable(port, "127.0.0.1") and _reachable(port, "::1")
        assert {s.getsockname()[1] for s in socks} == {port}
        return [s.family for s in socks]
    finally:
        for s in socks:
            s.close()


def test_all_addresses_is_one_dual_stack_socket() -> None:
    socks = listeners.bind_tcp("", 0)
    assert socks[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    assert _families_of_a_dual_stack_listener(socks) == [socket.AF_INET6]


def test_the_pair_fallback_shares_one_port() -> None:
    assert _families_of_a_dual_stack_listener(listeners.bind_pair(0)) == [socket.AF_INET6, socket.AF_INET]


def test_a_named_address_binds_only_there() -> None:
    socks = listeners.bind_tcp("127.0.0.1", 0)
    try:
        assert [s.family for s in socks] == [socket.AF_INET]
        port = _listening(socks)
        with pytest.raises(OSError):
            _reachable(port, "::1")
    finally:
        for s in socks:
            s.close()


def test_a_port_in_use_is_an_error() -> None:
    socks = listeners.bind_tcp("", 0)
    try:
        _listening(socks)
        with pytest.raises(OSError):
            listeners.bind_tcp("", socks[0].getsockname()[1])
    finally:
        for s in socks:
            s.close()
