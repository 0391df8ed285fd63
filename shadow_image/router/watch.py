"""Keeps the route table equal to the pod's kt-mesh-routes annotation.

The kubelet renders the annotations into a downward API file and replaces it atomically (a `..data`
symlink swap) within about a second of a change; polling its identity twice a second costs one stat and
sees every swap. A route change never touches requests already dispatched: they keep their Upstream.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ktwire.routes import ROUTES_ANNOTATION, Route, parse_routes
from shadow_image.router.table import RouteTable, parse_annotations_file

log = logging.getLogger("router")

INTERVAL = 0.5


class AnnotationsWatch:
    def __init__(self, path: str, table: RouteTable) -> None:
        self.path = path
        self.table = table
        self.loaded = False  # the file has been read at least once
        self._identity: tuple[int, int, int, int] | None = None
        self._complained = False

    def check(self) -> bool:
        """Reload if the file changed; True when the routes changed."""
        try:
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if identity == self._identity:
                return False
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            if not self._complained:
                log.warning("cannot read the annotations file %s: %s", self.path, exc.strerror or exc)
                self._complained = True
            return False
        self._complained = False
        self._identity = identity
        routes = parse_routes(parse_annotations_file(text).get(ROUTES_ANNOTATION, ""))
        first = not self.loaded
        self.loaded = True
        return self.apply(routes, first=first)

    def apply(self, routes: list[Route], *, first: bool = False) -> bool:
        old = self.table.routes
        if routes == old and not first:
            return False
        self.table.set_routes(routes)
        for key, value in routes:
            if (key, value) not in old:
                log.info("route added: %s", self._describe(key, value))
        for key, value in old:
            if (key, value) not in routes:
                log.info("route removed: %s", self._describe(key, value))
        if first and not routes:
            log.info("no routes yet: every request goes to %s", self._default())
        return routes != old

    def _describe(self, key: str, value: str) -> str:
        ups = [self.table.for_route(key, value, tp) for tp in self.table.ports]
        return f"{key.upper()}: {value} -> " + ", ".join(f"{u.host}:{u.port}" for u in ups)

    def _default(self) -> str:
        return ", ".join(self.table.default(tp).label for tp in self.table.ports)

    async def run(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(INTERVAL)
