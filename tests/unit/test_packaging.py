"""What `pip install .` and the published shadow image get must be what the tests ran."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_shadow_dockerfile_pins_the_locked_versions():
    text = (ROOT / "shadow_image" / "Dockerfile").read_text()
    pins = dict(re.findall(r"\b([a-z0-9_-]+)==([0-9][^\s]*)", text))
    lock = _lock()
    assert pins, "the Dockerfile pins nothing"
    # The shadow needs asyncssh and uvloop; the mesh router (same image) httptools and h2 with h2's own two.
    assert set(pins) == {"asyncssh", "uvloop", "httptools", "h2", "hpack", "hyperframe"}
    for name, version in pins.items():
        assert lock[name] == version, f"{name}: Dockerfile {version}, lock {lock[name]}"


def test_shadow_dockerfile_copies_the_shared_wire_package():
    text = (ROOT / "shadow_image" / "Dockerfile").read_text()
    assert "COPY ktwire " in text and "COPY shadow_image " in text


def test_lower_bounds_are_versions_the_code_works_with():
    # kubernetes < 37 has the legacy call_api signature; websockets < 15 lacks asyncio.client's proxy=;
    # asyncssh before 2.18 lacks what the wire patches hook (they turn themselves off, silently slow).
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.match(r"^([a-z0-9_-]+)>=([0-9.]+)", dep)
        if m:
            floors[m.group(1)] = tuple(int(x) for x in m.group(2).split("."))
    assert floors["kubernetes"] >= (37,)
    assert floors["websockets"] >= (15,)
    assert floors["asyncssh"] >= (2, 18)
    lock = _lock()
    for name, floor in floors.items():
        assert tuple(int(x) for x in lock[name].split(".")[: len(floor)]) >= floor
