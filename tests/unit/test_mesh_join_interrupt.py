"""Issue 18 G4 (mesh half): Ctrl-C while `ktctl mesh` waits for another developer's kt-lock ends the wait at
once (it ran its full 60 x 3 s before), and what was made before the lock (own mesh Service, shadow pod and
Secret) is labelled and heart-beaten, so a second Ctrl-C (exit without clean-up) leaves only what `ktctl
clean` sweeps."""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta

import pytest
from fake_kube import NOW, _Api, service
from fake_kube import FakeKube as _FakeKube

from ktproxy import lifecycle
from ktproxy.cleanup.sweep import sweep
from ktproxy.cluster import heartbeat
from ktproxy.commands.options import reverse_options
from ktproxy.expose import ExposedPort
from ktproxy.mesh.participant import AutoMesh
from ktproxy.mesh.spec import parse_version_mark
from ktproxy.shadow.pod import build_pod, build_secret

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]
HELD = str(int(NOW.timestamp()) - 5)  # another developer's fresh kt-lock


class FakeKube(_FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.core = _Api(self.store, {"service": "service", "pod": "pod", "secret": "secret",
                                      "config_map": "configmap"})

    async def require(self, _access: object) -> None:
        return None


def _locked_service(kube: FakeKube) -> None:
    kube.store.put("service", service("tomcat", {"app": "tomcat"}, PORTS, annotations={"kt-lock": HELD}))


def _participant(kube: FakeKube, life: lifecycle.Lifecycle, beats: list) -> AutoMesh:
    args = argparse.Namespace(timeout=5.0, skip_port_checking=True, auto_header=False)
    svc = kube.store.read("service", "tomcat", "default")
    one = AutoMesh(life, kube, reverse_options(args, kube.namespace), svc, [ExposedPort(18080, 8080, 8080)],
                   parse_version_mark("version:alice"))

    async def preflight() -> None:
        return None

    async def start() -> None:
        """What the shadow's session makes, as its own builders make it (labels, heartbeat)."""
        now = int(kube.now.timestamp())
        opts, role = one.shadow.shadow.options, one.shadow.spec.shadow_role()
        kube.store.put("secret", build_secret(one.own, opts, "ssh-ed25519 AAAAC3Nz test",
                                              "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n", now, role))
        kube.store.put("pod", build_pod(one.own, one.own, opts, now, role))

    one.shadow.preflight = preflight  # type: ignore[method-assign]
    one.shadow.start = start  # type: ignore[method-assign]
    return one


@pytest.fixture
def beats(monkeypatch: pytest.MonkeyPatch) -> list:
    """heartbeat_loop replaced by one that records which objects it would stamp, once per wake-up."""
    seen: list = []

    async def loop(_kube: object, objects, interval: float = 0.0) -> None:
        while True:
            seen.append(list(objects()))
            await asyncio.sleep(0.01)

    monkeypatch.setattr(heartbeat, "heartbeat_loop", loop)
    return seen


async def test_ctrl_c_ends_the_wait_for_another_developers_lock_at_once(beats: list) -> None:
    kube = FakeKube()
    _locked_service(kube)
    life = lifecycle.Lifecycle()
    one = _participant(kube, life, beats)
    task = asyncio.create_task(one.start())
    await asyncio.sleep(0.3)  # waiting for the lock now
    assert not task.done()
    # Own objects exist and beat while it waits; router and stuntman are not stamped before joining.
    assert ("service", "default", "tomcat-kt-mesh-alice") in kube.store.objects
    assert beats and beats[-1] == [("service", "default", "tomcat-kt-mesh-alice")], beats[-1:]
    life.stopping.set()  # the first Ctrl-C
    async with asyncio.timeout(2):  # not 60 tries x 3 s
        with pytest.raises(lifecycle.Stopped):
            await task
    assert not one.joined
    # The other developer's lock is theirs: left as it was.
    assert kube.store.get("service", "default", "tomcat")["metadata"]["annotations"]["kt-lock"] == HELD
    await life._stack.aclose()  # the orderly clean-up the first Ctrl-C starts (the stub shadow has none)
    assert ("service", "default", "tomcat-kt-mesh-alice") not in kube.store.objects


async def test_a_second_ctrl_c_leaves_only_what_clean_sweeps(beats: list) -> None:
    kube = FakeKube()
    _locked_service(kube)
    life = lifecycle.Lifecycle()
    one = _participant(kube, life, beats)
    task = asyncio.create_task(one.start())
    await asyncio.sleep(0.3)
    life.stopping.set()
    async with asyncio.timeout(2):
        with pytest.raises(lifecycle.Stopped):
            await task
    # The second Ctrl-C exits without clean-up: shadow pod, Secret and mesh Service stay behind ...
    left = {k for k in kube.store.objects if "kt-mesh" in k[2]}
    assert left == {("pod", "default", "tomcat-kt-mesh-alice"), ("secret", "default", "tomcat-kt-mesh-alice"),
                    ("service", "default", "tomcat-kt-mesh-alice")}, left
    # ... all of them labelled so clean finds them, swept once their heartbeat is stale.
    kube.now = NOW + timedelta(minutes=10)
    result = await sweep(kube, "default")
    assert not [k for k in kube.store.objects if "kt-mesh" in k[2]], kube.store.objects
    assert not result.failed
    assert kube.store.get("service", "default", "tomcat")["spec"]["selector"] == {"app": "tomcat"}
    for task in asyncio.all_tasks():  # the heartbeat task of the process that "exited"
        if task is not asyncio.current_task():
            task.cancel()


async def test_a_further_ctrl_c_while_leaving_ends_only_the_wait_for_the_lock(beats: list) -> None:
    """Leaving (clean-up) also waits for the lock: a further Ctrl-C cuts that wait short and the rest of the
    clean-up runs (before, it exited at once); the route stays for `clean` to remove."""
    import signal

    from ktproxy.errors import KtError

    kube = FakeKube()
    _locked_service(kube)
    life = lifecycle.Lifecycle()
    one = _participant(kube, life, beats)
    one.joined = True
    life.stopping.set()  # clean-up is under way
    task = asyncio.create_task(one.leave())
    await asyncio.sleep(0.3)
    assert not task.done()
    life._on_signal(signal.SIGINT)  # the further Ctrl-C: a wait marked interruptible ends, no os._exit
    async with asyncio.timeout(2):
        with pytest.raises(KtError, match="stopped waiting for the kt-lock"):
            await task
