"""The mesh route grammar both ends share: what a route is, and how the router pod's annotation spells it.

ktctl writes the annotation (ktproxy/mesh/), the router reads it (shadow_image/router/table.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ROUTES_ANNOTATION = "kt-mesh-routes"
# What a header name (RFC 9110 token, lower-cased) and a route value (it becomes part of a Service name,
# a DNS label) may be; anything else in the annotation is ignored, never half-parsed.
_KEY = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_VALUE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

Route = tuple[str, str]  # (header name lower-case, value)


def is_route(key: str, value: str) -> bool:
    return bool(_KEY.match(key) and _VALUE.match(value))


def format_routes(routes: Iterable[Route]) -> str:
    return ",".join(f"{k}:{v}" for k, v in routes)


def parse_routes(text: str) -> list[Route]:
    """`version:abcde,version:fghij` -> [("version", "abcde"), ...]; malformed pairs are skipped."""
    out: list[Route] = []
    for part in text.split(","):
        key, sep, value = part.strip().partition(":")
        key = key.strip().lower()
        value = value.strip()
        if sep and is_route(key, value) and (key, value) not in out:
            out.append((key, value))
    return out
