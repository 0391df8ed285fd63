"""SOCKS5 / SOCKS4 / SOCKS4a parsing, fed through a real asyncio.StreamReader."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktproxy.proxy import socks


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


# -- a small independent encoder ---------------------------------------------------------------
def enc5(host: str | bytes, port: int, cmd: int = 1, atyp: int | None = None, ver: int = 5) -> bytes:
    """A SOCKS5 request (after the greeting), as a client would send it."""
    if isinstance(host, bytes):
        addr = bytes([0x03, len(host)]) + host
    else:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raw = host.encode("idna")
            addr = bytes([0x03, len(raw)]) + raw
        else:
            addr = bytes([0x01 if ip.version == 4 else 0x04]) + ip.packed
    if atyp is not None:
        addr = bytes([atyp]) + addr[1:]
    return bytes([ver, cmd, 0]) + addr + struct.pack("!H", port)


def enc4(ip: str, port: int, user: bytes = b"", cmd: int = 1) -> bytes:
    """A SOCKS4 request after the version byte."""
    return bytes([cmd]) + struct.pack("!H", port) + ipaddress.IPv4Address(ip).packed + user + b"\0"


def enc4a(name: bytes, port: int, user: bytes = b"", cmd: int = 1) -> bytes:
    return bytes([cmd]) + struct.pack("!H", port) + b"\0\0\0\x01" + user + b"\0" + name + b"\0"


# -- SOCKS5 greeting and user/pass --------------------------------------------------------------
async def test_greeting_methods():
    assert await socks.read_socks5_greeting(reader_of(b"\x02\x00\x02")) == {0, 2}


async def test_greeting_no_methods_is_an_error():
    with pytest.raises(socks.SocksError):
        await socks.read_socks5_greeting(reader_of(b"\x00"))


async def test_greeting_truncated():
    with pytest.raises(asyncio.IncompleteReadError):
        await socks.read_socks5_greeting(reader_of(b"\x03\x00"))


async def test_userpass():
    data = b"\x01\x04user\x06s3cr:t"
    assert await socks.read_userpass(reader_of(data)) == ("user", "s3cr:t")


async def test_userpass_empty_fields():
    assert await socks.read_userpass(reader_of(b"\x01\x00\x00")) == ("", "")


async def test_userpass_bad_version():
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_userpass(reader_of(b"\x05\x04user\x04pass"))
    assert ei.value.reply is None


async def test_userpass_truncated():
    with pytest.raises(asyncio.IncompleteReadError):
        await socks.read_userpass(reader_of(b"\x01\x04us"))


@given(st.binary(max_size=255), st.binary(max_size=255))
async def test_userpass_roundtrip(user, password):
    data = bytes([1, len(user)]) + user + bytes([len(password)]) + password
    got = await socks.read_userpass(reader_of(data))
    assert got == (user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))


# -- SOCKS5 requests ----------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["10.96.0.10", "0.0.0.0", "255.255.255.255"])
async def test_request_ipv4(host):
    req = await socks.read_socks5_request(reader_of(enc5(host, 80)))
    assert req == socks.SocksRequest(5, host, 80)


@pytest.mark.parametrize("host", ["::1", "fd00:10:96::a", "2001:db8::1:0:0:1"])
async def test_request_ipv6(host):
    req = await socks.read_socks5_request(reader_of(enc5(host, 443)))
    assert req.host == str(ipaddress.IPv6Address(host))
    assert req.port == 443


async def test_request_domain():
    req = await socks.read_socks5_request(reader_of(enc5(b"tomcat.default.svc.cluster.local", 8080)))
    assert req == socks.SocksRequest(5, "tomcat.default.svc.cluster.local", 8080)


async def test_request_domain_leaves_no_bytes_behind():
    r = reader_of(enc5(b"tomcat", 8080) + b"payload")
    await socks.read_socks5_request(r)
    assert await r.read() == b"payload"


@pytest.mark.parametrize("wire", [b"xn--bcher-kva.example", b"xn--strae-oqa.de", b"xn--nxasmq6b.example"])
async def test_request_idna_a_label_is_kept_as_sent(wire):
    # The A-label is the name DNS knows; decoding it (IDNA 2003) and re-encoding can change the
    # host (straße -> strasse) or refuse a valid IDNA 2008 name outright.
    req = await socks.read_socks5_request(reader_of(enc5(wire, 80)))
    assert req.host == wire.decode("ascii")
    assert req.host.encode("ascii") == wire


async def test_request_utf8_domain():
    req = await socks.read_socks5_request(reader_of(enc5("bücher.example".encode(), 80)))
    assert req.host == "bücher.example"


async def test_request_undecodable_domain():
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5(b"\xff\xfe.example", 80)))
    assert ei.value.reply == socks.REP_HOST_UNREACHABLE


@pytest.mark.parametrize("name", [b"", b"a\x00b"])
async def test_request_empty_or_nul_domain(name):
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5(name, 80)))
    assert ei.value.reply == socks.REP_HOST_UNREACHABLE


async def test_request_bad_version():
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5("10.0.0.1", 80, ver=4)))
    assert ei.value.reply == socks.REP_FAILURE


@pytest.mark.parametrize("cmd", [0x02, 0x03, 0x00, 0x09])  # BIND, UDP ASSOCIATE, junk
async def test_request_unsupported_command(cmd):
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5("10.0.0.1", 80, cmd=cmd)))
    assert ei.value.reply == socks.REP_CMD_UNSUPPORTED == 0x07


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
async def test_request_bad_atyp(atyp):
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5("10.0.0.1", 80, atyp=atyp)))
    assert ei.value.reply == socks.REP_ATYP_UNSUPPORTED == 0x08


async def test_request_port_zero():
    with pytest.raises(socks.SocksError) as ei:
        await socks.read_socks5_request(reader_of(enc5("10.0.0.1", 0)))
    assert ei.value.reply is not None and ei.value.reply != socks.REP_OK


@pytest.mark.parametrize("host", ["10.0.0.1", "fd00::1", b"svc.ns"])
async def test_request_truncated_anywhere(host):
    full = enc5(host, 8080)
    for cut in range(len(full)):
        with pytest.raises(asyncio.IncompleteReadError):
            await socks.read_socks5_request(reader_of(full[:cut]))


@given(st.ip_addresses(), st.integers(1, 65535))
async def test_request_ip_roundtrip(ip, port):
    req = await socks.read_socks5_request(reader_of(enc5(str(ip), port)))
    assert ipaddress.ip_address(req.host) == ip
    assert req.port == port and req.version == 5


dns_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
dns_name = st.lists(dns_label, min_size=1, max_size=5).map(".".join).filter(lambda s: len(s) <= 255)


@given(dns_name, st.integers(1, 65535))
async def test_request_domain_roundtrip(name, port):
    req = await socks.read_socks5_request(reader_of(enc5(name.encode(), port) + b"rest"))
    assert (req.host, req.port) == (name, port)


@given(st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b), st.integers(1, 65535))
async def test_request_arbitrary_domain_bytes_never_crash(raw, port):
    r = reader_of(enc5(raw, port) + b"rest")
    try:
        req = await socks.read_socks5_request(r)
    except socks.SocksError as exc:
        assert exc.reply == socks.REP_HOST_UNREACHABLE
    else:
        assert req.port == port and req.host
        if raw.isascii():
            assert req.host == raw.decode()
    assert await r.read() == b"rest"  # the whole request was consumed either way


@given(st.binary(max_size=40))
async def test_request_garbage_raises_only_protocol_errors(data):
    try:
        await socks.read_socks5_request(reader_of(data))
    except (socks.SocksError, asyncio.IncompleteReadError):
        pass


# -- replies ------------------------------------------------------------------------------------
def test_reply_default():
    assert socks.socks5_reply(socks.REP_OK) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


def test_reply_ipv4_and_port():
    assert socks.socks5_reply(0x05, "10.1.2.3", 8080) == b"\x05\x05\x00\x01\x0a\x01\x02\x03\x1f\x90"


def test_reply_ipv6():
    out = socks.socks5_reply(0x00, "::1", 1)
    assert out == b"\x05\x00\x00\x04" + b"\0" * 15 + b"\x01" + b"\x00\x01"


@given(st.integers(0, 255), st.ip_addresses(), st.integers(0, 65535))
def test_reply_roundtrip(code, ip, port):
    out = socks.socks5_reply(code, str(ip), port)
    assert out[:3] == bytes([5, code, 0])
    assert out[3] == (1 if ip.version == 4 else 4)
    assert out[4:-2] == ip.packed
    assert struct.unpack("!H", out[-2:])[0] == port


def test_dial_errors_map_to_socks_codes():
    assert socks.DIAL_ERROR_REPLY["refused"] == 0x05
    assert socks.DIAL_ERROR_REPLY["unreachable"] == 0x04
    assert socks.DIAL_ERROR_REPLY["timeout"] == 0x06


def test_socks4_replies():
    assert socks.socks4_reply(True) == b"\x00\x5a" + b"\0" * 6
    assert socks.socks4_reply(False) == b"\x00\x5b" + b"\0" * 6


# -- SOCKS4 / SOCKS4a ---------------------------------------------------------------------------
async def test_socks4_ip():
    req = await socks.read_socks4_request(reader_of(enc4("10.96.0.1", 443, b"alice")))
    assert req == socks.SocksRequest(4, "10.96.0.1", 443)


async def test_socks4a_name():
    r = reader_of(enc4a(b"tomcat.default", 8080, b"bob") + b"GET /")
    req = await socks.read_socks4_request(r)
    assert req == socks.SocksRequest(4, "tomcat.default", 8080)
    assert await r.read() == b"GET /"


async def test_socks4a_idna_kept_as_sent():
    req = await socks.read_socks4_request(reader_of(enc4a(b"xn--strae-oqa.de", 80)))
    assert req.host == "xn--strae-oqa.de"


async def test_socks4_address_zero_is_plain_socks4():
    # 0.0.0.0 is not the 4a marker (that is 0.0.0.x with x != 0)
    req = await socks.read_socks4_request(reader_of(enc4("0.0.0.0", 80)))
    assert req.host == "0.0.0.0"


async def test_socks4a_empty_name():
    with pytest.raises(socks.SocksError):
        await socks.read_socks4_request(reader_of(enc4a(b"", 80)))


async def test_socks4_bind_refused():
    with pytest.raises(socks.SocksError):
        await socks.read_socks4_request(reader_of(enc4("10.0.0.1", 80, cmd=2)))


async def test_socks4_port_zero_refused():
    with pytest.raises(socks.SocksError):
        await socks.read_socks4_request(reader_of(enc4("10.0.0.1", 0)))


async def test_socks4_user_id_too_long():
    with pytest.raises(socks.SocksError):
        await socks.read_socks4_request(reader_of(enc4("10.0.0.1", 80, b"u" * 300)))


@pytest.mark.parametrize("data", [enc4("10.0.0.1", 80, b"user"), enc4a(b"svc", 80, b"u")])
async def test_socks4_truncated_anywhere(data):
    for cut in range(len(data)):
        with pytest.raises(asyncio.IncompleteReadError):
            await socks.read_socks4_request(reader_of(data[:cut]))


@given(st.ip_addresses(v=4).filter(lambda ip: not (ip.packed[:3] == b"\0\0\0" and ip.packed[3])),
       st.integers(1, 65535), st.binary(max_size=100).filter(lambda b: b"\0" not in b))
async def test_socks4_roundtrip(ip, port, user):
    req = await socks.read_socks4_request(reader_of(enc4(str(ip), port, user)))
    assert (req.version, req.host, req.port) == (4, str(ip), port)


@given(dns_name, st.integers(1, 65535), st.binary(max_size=100).filter(lambda b: b"\0" not in b))
async def test_socks4a_roundtrip(name, port, user):
    r = reader_of(enc4a(name.encode(), port, user) + b"x")
    req = await socks.read_socks4_request(r)
    assert (req.version, req.host, req.port) == (4, name, port)
    assert await r.read() == b"x"
