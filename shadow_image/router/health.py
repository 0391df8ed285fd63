"""The router's probe and introspection endpoint: the shadow's (GET /ready: 200 once every listener is up
and the annotations file was read, else 503 with the reason; GET /live) plus GET /routes (JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable

from ktwire.routes import Route
from shadow_image import listeners
from shadow_image.health import serve_health


def routes_page(routes: Callable[[], list[Route]]) -> tuple[str, str]:
    return "application/json", json.dumps({"routes": [list(r) for r in routes()]}) + "\n"


async def serve(port: int, ready: Callable[[], tuple[bool, str]],
                routes: Callable[[], list[Route]]) -> listeners.Listening:
    return await serve_health(port, ready, {"/routes": lambda: routes_page(routes)})
