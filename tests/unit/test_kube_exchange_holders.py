"""Two developers, sleeping laptops, retries (review 2026-12-04, issue 18): who holds a Service.

- G1: a selector guard stands down (one WARNING naming the holder or "ktctl recover") once someone
  else holds the Service, recover sticks, and the stood-down exchange does not restore at exit;
- G4: waiting for another user's kt-lock ends at the first Ctrl-C, and a cancelled acquire leaves no lock;
- G5: urllib3 never resends a PATCH/PUT/POST, and a write whose answer was lost is recognised as ours;
- G6: scale mode takes the kt-lock, re-reads under it, patches with resourceVersion and is seen (and
  sees the others) as the Service's holder.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

import pytest
from fake_kube import NOW, FakeKube, deployment, pod, service
from kubernetes import client as k8s

from ktproxy import lifecycle
from ktproxy.cluster import meta
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.errors import KubeError
from ktproxy.errors import KtError
from ktproxy.exchange import holder, lock, scale, session, takeover
from ktproxy.exchange.target import ExchangeTarget
from ktproxy.mesh import shared as mesh
from ktproxy.shadow import reverse

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]
ORIGINAL = {"app": "tomcat"}
ALICE = {"kt-role": "shadow-exchange", "kt-target": "alice1"}
ALICE2 = {"kt-role": "shadow-exchange", "kt-target": "alice2"}
BOB = {"kt-role": "shadow-exchange", "kt-target": "bob1"}


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.store.put("service", service("tomcat", dict(ORIGINAL), PORTS))
    k.store.put("deployment", deployment("tomcat", dict(ORIGINAL), replicas=2))
    return k


def svc(kube: FakeKube) -> dict[str, Any]:
    return kube.store.get("service", "default", "tomcat")


def ann(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("annotations") or {})


def start_guard(kube: FakeKube, labels: dict[str, str], original: dict[str, str], user: str) -> asyncio.Task[str]:
    return asyncio.create_task(takeover.guard_selector(kube, "default", "tomcat", labels, original, user,
                                                       interval=0.01))


async def stop(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def stand_downs(caplog: pytest.LogCaptureFixture) -> list[str]:
    records = {id(r): r for r in caplog.records}.values()  # kt_log may see a record twice
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "stands down" in r.getMessage()]


# ------------------------------------------------------------------------------------------------- G1
async def test_recover_sticks_while_the_exchange_lives(kube: FakeKube, kt_log: pytest.LogCaptureFixture) -> None:
    original = await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice")
    kube.store.put("pod", pod("tomcat-kt-exchange-a", ALICE))  # alive (re-created by its supervisor)
    guard = start_guard(kube, ALICE, original, "alice")
    await asyncio.sleep(0.05)
    assert await takeover.restore_selector(kube, "default", "tomcat")  # what `ktctl recover` does
    assert await asyncio.wait_for(guard, 2) == "ktctl recover"
    await asyncio.sleep(0.1)  # > 3 guard intervals: nobody puts the exchange back
    assert svc(kube)["spec"]["selector"] == ORIGINAL and ann(svc(kube)) == {}
    lines = stand_downs(kt_log)
    assert len(lines) == 1 and "ktctl recover" in lines[0], lines


async def test_guard_stands_down_for_another_developer(kube: FakeKube, kt_log: pytest.LogCaptureFixture) -> None:
    # Alice's laptop slept, a sweep restored the Service, Bob exchanged it; Alice's shadow is back.
    original = await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice")
    kube.store.put("pod", pod("tomcat-kt-exchange-a", ALICE))
    await takeover.restore_selector(kube, "default", "tomcat")
    await takeover.switch_selector(kube, "default", "tomcat", BOB, "bob")
    kube.store.put("pod", pod("tomcat-kt-exchange-b", BOB))
    guard = start_guard(kube, ALICE, original, "alice")
    assert await asyncio.wait_for(guard, 2) == "bob"
    assert svc(kube)["spec"]["selector"] == BOB and ann(svc(kube))["kt-user"] == "bob"
    assert [line for line in stand_downs(kt_log) if "held by bob" in line]
    # and Alice's exit leaves Bob's exchange alone
    assert await takeover.restore_selector(kube, "default", "tomcat",
                                           owner=(ALICE, takeover.encode_selector(original), "alice")) is False
    assert svc(kube)["spec"]["selector"] == BOB


async def test_guard_stands_down_for_the_same_users_second_session(kube: FakeKube) -> None:
    original = await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice")
    kube.store.put("pod", pod("tomcat-kt-exchange-a", ALICE))
    await takeover.restore_selector(kube, "default", "tomcat")
    await takeover.switch_selector(kube, "default", "tomcat", ALICE2, "alice")
    guard = start_guard(kube, ALICE, original, "alice")
    assert "another session" in await asyncio.wait_for(guard, 2)
    assert svc(kube)["spec"]["selector"] == ALICE2


async def test_guard_still_puts_back_an_overwritten_selector(kube: FakeKube) -> None:
    # kubectl apply of the Service's manifest: the selector is the original, kt-selector/kt-user stay ours.
    original = await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice")
    kube.store.put("pod", pod("tomcat-kt-exchange-a", ALICE))
    guard = start_guard(kube, ALICE, original, "alice")
    try:
        kube.store.patch("service", "tomcat", "default",
                         {"spec": {"selector": {"kt-role": None, "kt-target": None, "app": "tomcat"}}})
        await kube.store.until(lambda: svc(kube)["spec"]["selector"] == ALICE)
        assert not guard.done()
    finally:
        await stop(guard)


async def test_a_stood_down_exchange_only_deletes_its_shadow_at_exit(kube: FakeKube) -> None:
    original = await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice")
    owner = (ALICE, takeover.encode_selector(original), "alice")
    await takeover.restore_selector(kube, "default", "tomcat")  # recover
    await takeover.switch_selector(kube, "default", "tomcat", BOB, "bob")

    class Shadow:
        released = False

        async def wait_released(self, name: str) -> None:
            self.released = True

    async def stood_down() -> str:
        return "bob"

    shadow = Shadow()
    guard = asyncio.create_task(stood_down())
    await guard
    await session._restore(kube, "default", "tomcat", shadow, guard, owner)  # type: ignore[arg-type]
    assert svc(kube)["spec"]["selector"] == BOB and ann(svc(kube))["kt-user"] == "bob"
    # the guard had not looked yet (cancelled): the restore itself sees Bob holds it
    guard = asyncio.create_task(asyncio.sleep(10))
    await stop(guard)
    await session._restore(kube, "default", "tomcat", shadow, guard, owner)  # type: ignore[arg-type]
    assert svc(kube)["spec"]["selector"] == BOB


# ------------------------------------------------------------------------------------------------- G5
def test_urllib3_resends_no_write_that_may_have_landed() -> None:
    cfg = k8s.Configuration()
    cfg.host = "https://127.0.0.1:1"
    retry = KubeClient(cfg, "default").configuration.retries
    for method in ("PATCH", "PUT", "POST"):
        assert not retry._is_method_retryable(method), method
    for method in ("GET", "DELETE"):
        assert retry._is_method_retryable(method), method


def lose_first_answer(kube: FakeKube, monkeypatch: pytest.MonkeyPatch, status: int | None = 409) -> list[int]:
    """The first PATCH lands but its answer is lost: the caller sees a 409 (urllib3's resend of it
    conflicting with itself) or no answer at all."""
    real = kube.store.patch
    lost: list[int] = []

    def patch(kind: str, name: str, ns: str, body: dict[str, Any], **kw: Any) -> Any:
        result = real(kind, name, ns, body, **kw)
        if not lost:
            lost.append(1)
            raise KubeError("the object has been modified" if status else "cannot reach the API server", status)
        return result

    monkeypatch.setattr(kube.store, "patch", patch)
    return lost


@pytest.mark.parametrize("status", [409, None])
async def test_switch_recognises_its_own_landed_write(kube: FakeKube, monkeypatch: pytest.MonkeyPatch,
                                                      status: int | None) -> None:
    lost = lose_first_answer(kube, monkeypatch, status)
    assert await takeover.switch_selector(kube, "default", "tomcat", ALICE, "alice") == ORIGINAL
    assert lost and svc(kube)["spec"]["selector"] == ALICE
    assert json.loads(ann(svc(kube))["kt-selector"]) == ORIGINAL


async def test_lock_recognises_its_own_landed_write(kube: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    lose_first_answer(kube, monkeypatch)
    value = await lock.acquire(kube, "default", "tomcat", tries=2, retry_interval=0)
    assert ann(svc(kube))["kt-lock"] == value
    assert await lock.release(kube, "default", "tomcat", held=value)
    assert ann(svc(kube)) == {}


async def test_lock_of_someone_else_with_the_same_value_is_not_ours(kube: FakeKube) -> None:
    # Another set-up took the lock in the same second: the value alone would pass for ours.
    same = str(int(NOW.timestamp()))
    kube.store.patch("service", "tomcat", "default", {"metadata": {"annotations": {"kt-lock": same}}})
    assert not await lock._holds(kube, "default", "tomcat", same, "mytoken")


# ------------------------------------------------------------------------------------------------- G4
class FakeShadow:
    """ReverseShadow without pods or SSH: start() puts a pod with the spec's labels into the store."""

    started: ClassVar[list[str]] = []

    def __init__(self, life: Any, kube: FakeKube, options: Any, spec: reverse.ReverseSpec) -> None:
        self.kube, self.spec = kube, spec
        self.shadow = type("S", (), {"options": type("O", (), {"user": options})(), "on_lost": []})()
        self.pod_name = "?"

    async def preflight(self) -> None:
        return None

    async def start(self) -> None:
        name = f"{self.spec.name_prefix}{len(FakeShadow.started)}"
        FakeShadow.started.append(name)
        self.kube.store.put("pod", pod(name, dict(self.spec.labels),
                                       annotations={**self.spec.annotations, "kt-user": self.shadow.options.user}))

    async def wait_serving(self, service: str) -> None:
        return None

    async def wait_released(self, service: str) -> None:
        return None


@pytest.fixture
def shadows(monkeypatch: pytest.MonkeyPatch, kube: FakeKube) -> list[str]:
    FakeShadow.started = []
    monkeypatch.setattr(reverse, "ReverseShadow", FakeShadow)

    async def require(accesses: Any) -> None:
        return None

    kube.require = require  # type: ignore[attr-defined]
    return FakeShadow.started


def target(kube: FakeKube, deploy: bool = False) -> ExchangeTarget:
    dep = kube.store.read("deployment", "tomcat", "default") if deploy else None
    return ExchangeTarget("service", "tomcat", kube.store.read("service", "tomcat", "default"), dep)


async def test_ctrl_c_ends_the_wait_for_another_users_lock(kube: FakeKube, shadows: list[str]) -> None:
    theirs = str(int(NOW.timestamp()))
    kube.store.patch("service", "tomcat", "default", {"metadata": {"annotations": {"kt-lock": theirs}}})
    life = lifecycle.Lifecycle()
    take = asyncio.create_task(session.take_selector(life, kube, "alice", target(kube), []))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # waiting for the lock (3 s between looks)
    life.stopping.set()  # the first Ctrl-C
    with pytest.raises(lifecycle.Stopped):
        await asyncio.wait_for(take, 2)
    assert shadows == [] and ann(svc(kube)) == {"kt-lock": theirs}  # nothing of ours, their lock kept


async def test_cancelled_while_writing_the_lock_leaves_none(kube: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    writing = asyncio.Event()

    async def slow_patch(kube_: Any, ns: str, name: str, body: dict[str, Any]) -> Any:
        writing.set()
        await asyncio.sleep(0.1)  # the worker thread's PATCH still on the wire
        return kube.store.patch("service", name, ns, body)

    monkeypatch.setattr(lock, "patch", slow_patch)
    task = asyncio.create_task(lock.acquire(kube, "default", "tomcat"))
    await writing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "kt-lock" not in ann(svc(kube))


# ------------------------------------------------------------------------------------------------- G6
async def test_second_scale_exchange_is_refused_under_the_lock(kube: FakeKube, shadows: list[str]) -> None:
    stale = target(kube, deploy=True)  # both read the Deployment (2 replicas) before either started
    await session.take_by_scale(lifecycle.Lifecycle(), kube, "alice", stale, [], 1.0)  # type: ignore[arg-type]
    dep = kube.store.get("deployment", "default", "tomcat")
    assert dep["spec"]["replicas"] == 0 and ann(dep)["kt-user"] == "alice"
    assert "kt-lock" not in ann(svc(kube))  # released after set-up
    with pytest.raises(KtError, match="by alice"):
        await session.take_by_scale(lifecycle.Lifecycle(), kube, "bob", stale, [], 1.0)  # type: ignore[arg-type]
    assert len(shadows) == 1
    assert ann(kube.store.get("deployment", "default", "tomcat"))["kt-config"] == "replicas=2"


async def test_scale_down_writes_with_the_resource_version_and_retries_a_conflict(kube: FakeKube) -> None:
    kube.store.conflicts = 1
    d = kube.store.read("deployment", "tomcat", "default")
    assert await scale.scale_down(kube, "default", d, "alice") == 2
    writes = [b for kind, _, b in kube.store.patches if kind == "deployment"]
    assert len(writes) == 2 and all(b["metadata"]["resourceVersion"] for b in writes)


async def test_selector_exchange_and_mesh_refuse_a_scale_exchanged_service(kube: FakeKube,
                                                                           shadows: list[str]) -> None:
    await session.take_by_scale(lifecycle.Lifecycle(), kube, "alice", target(kube, True), [], 1.0)  # type: ignore[arg-type]
    current = kube.store.read("service", "tomcat", "default")
    with pytest.raises(KtError, match=r"^service 'tomcat' is already exchanged \(scale mode\) by alice"):
        await holder.refuse_if_taken(kube, "default", current)
    with pytest.raises(KtError, match=r"already exchanged \(scale mode\) by alice"):
        await mesh.refuse_if_exchanged(kube, "default", current)
    # the shadow gone (a sweep), the Deployment still at 0: still held, recover named
    kube.store.delete("pod", shadows[0], "default")
    with pytest.raises(KtError, match="ktctl recover tomcat"):
        await holder.refuse_if_taken(kube, "default", current)


async def test_scale_exchange_refuses_a_service_switched_meanwhile(kube: FakeKube, shadows: list[str]) -> None:
    stale = target(kube, deploy=True)  # read before Bob's selector exchange finished
    await takeover.switch_selector(kube, "default", "tomcat", BOB, "bob")
    with pytest.raises(KtError, match="already exchanged by bob"):
        await session.take_by_scale(lifecycle.Lifecycle(), kube, "alice", stale, [], 1.0)  # type: ignore[arg-type]
    assert shadows == [] and kube.store.get("deployment", "default", "tomcat")["spec"]["replicas"] == 2
    assert meta.KT_LOCK not in ann(svc(kube))
