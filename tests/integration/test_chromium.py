"""Headless Debian Chromium with the PAC URL loads a page only the namespace serves."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from itlib import DEMO_MARKER, TOMCAT_IP, TOMCAT_MARKER, clean_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.chromium,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


def dump_dom(plane, url: str, profile) -> subprocess.CompletedProcess[str]:
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            # Network safety: any name Chromium would resolve itself fails, so whatever it fetches
            # goes to loopback (the PAC, the proxy) and nowhere else. Names sent to the SOCKS5/HTTP
            # proxy are not resolved locally, so the page load does not depend on this rule.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--proxy-pac-url=http://127.0.0.1:{plane.proxy_port}/proxy.pac",
            "--dump-dom", url]
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=60)


@pytest.mark.parametrize("url", ["http://tomcat:8080/", "http://tomcat.default.svc.cluster.local:8080/",
                                 "http://demo.demo/",
                                 f"http://{TOMCAT_IP}:8080/"])
def test_chromium_pac_loads_namespace_page(dataplane, tmp_path, url):
    r = dump_dom(dataplane, url, tmp_path / "profile")
    marker = DEMO_MARKER if "demo" in url else TOMCAT_MARKER
    assert marker in r.stdout, f"stdout={r.stdout[-1000:]!r}\nstderr={r.stderr[-3000:]}"
