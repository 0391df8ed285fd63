"""One host:port parser for every flag and address both ends accept."""

from __future__ import annotations


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port', ':port' or (with a default) 'host' / '[v6]' -> (host, port).

    An empty host stays empty: the caller decides what "all addresses" means. Raises ValueError with a
    message fit for the user.
    """
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {value!r}")
        port_s = rest[1:]
    elif value.count(":") == 1:
        host, _, port_s = value.partition(":")
    elif value.count(":") > 1:
        raise ValueError(f"bad address {value!r} (write an IPv6 address as [addr]:port)")
    else:
        host, port_s = value, ""
    if not port_s:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: no port")
        return host, default_port
    if not port_s.isdigit() or len(port_s) > 5 or not 0 <= int(port_s) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_s)
