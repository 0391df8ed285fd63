"""Selector takeover (switch, restore, refusal naming the holder, 409 retries, the guard) and kt-lock."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fake_kube import NOW, FakeKube, pod, service

from ktproxy.errors import KtError
from ktproxy.exchange import lock, takeover

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]
OURS = {"kt-role": "shadow-exchange", "kt-target": "abc"}


@pytest.fixture
def kube():
    k = FakeKube()
    k.store.put("service", service("tomcat", {"app": "tomcat", "tier": "web"}, PORTS))
    return k


def svc(kube):
    return kube.store.get("service", "default", "tomcat")


async def test_switch_and_restore_round_trip(kube):
    before = json.loads(json.dumps(svc(kube)))
    original = await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    assert original == {"app": "tomcat", "tier": "web"}
    now = svc(kube)
    assert now["spec"]["selector"] == OURS  # old keys removed, not merged
    assert now["metadata"]["annotations"] == {"kt-selector": '{"app":"tomcat","tier":"web"}', "kt-user": "alice"}
    assert await takeover.restore_selector(kube, "default", "tomcat") is True
    after = svc(kube)
    assert after["spec"] == before["spec"] and "annotations" not in after["metadata"]
    assert await takeover.restore_selector(kube, "default", "tomcat") is False


async def test_second_exchange_is_refused_naming_the_holder(kube):
    await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    with pytest.raises(KtError) as err:
        await takeover.switch_selector(kube, "default", "tomcat", {**OURS, "kt-target": "x"}, "bob")
    assert str(err.value).startswith("service 'tomcat' is already exchanged by alice")
    assert svc(kube)["spec"]["selector"] == OURS


async def test_meshed_service_is_refused_with_holder_from_router_pod():
    kube = FakeKube()
    kube.store.put("service", service("api", {"kt-role": "router", "kt-target": "r"}, PORTS,
                                      annotations={"kt-selector": '{"app":"api"}'}))
    kube.store.put("pod", pod("api-kt-router", {"kt-role": "router", "kt-target": "r"},
                              annotations={"kt-user": "carol"}))
    with pytest.raises(KtError, match=r"^service 'api' is already meshed by carol"):
        await takeover.switch_selector(kube, "default", "api", OURS, "bob")


async def test_preview_or_selectorless_service_cannot_be_exchanged():
    kube = FakeKube()
    kube.store.put("service", service("pv", {"kt-role": "shadow-preview", "kt-target": "p"}, PORTS))
    kube.store.put("service", service("manual", None, PORTS))
    with pytest.raises(KtError, match="selects ktctl's own pods"):
        await takeover.switch_selector(kube, "default", "pv", OURS, "bob")
    with pytest.raises(KtError, match="has no selector"):
        await takeover.switch_selector(kube, "default", "manual", OURS, "bob")


async def test_conflicts_are_retried(kube):
    kube.store.conflicts = 3
    await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    assert svc(kube)["spec"]["selector"] == OURS
    assert all(b["metadata"]["resourceVersion"] for _, _, b in kube.store.patches)
    kube.store.conflicts = takeover.CONFLICT_RETRIES
    with pytest.raises(KtError, match="keeps changing under us"):
        await takeover.restore_selector(kube, "default", "tomcat")


async def test_guard_puts_our_selector_back_only_while_a_shadow_lives(kube, caplog):
    caplog.set_level(logging.INFO, logger="ktproxy")
    original = await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    guard = asyncio.create_task(takeover.guard_selector(kube, "default", "tomcat", OURS, original, "alice",
                                                        interval=0.01))
    try:
        kube.store.patch("service", "tomcat", "default", {"spec": {"selector": {"kt-role": None, "kt-target": None,
                                                                                "app": "hijack"}}})
        await asyncio.sleep(0.1)  # no live shadow: recover may be restoring; the guard must not fight it
        assert svc(kube)["spec"]["selector"] == {"app": "hijack"}
        kube.store.put("pod", pod("tomcat-kt-exchange-x", OURS))
        await kube.store.until(lambda: svc(kube)["spec"]["selector"] == OURS)
        assert json.loads(svc(kube)["metadata"]["annotations"]["kt-selector"]) == original
        assert any("was changed by someone else" in r.getMessage() for r in caplog.records)
    finally:
        guard.cancel()
        with pytest.raises(asyncio.CancelledError):
            await guard


async def test_guard_cancelled_mid_write_ends_only_after_the_write_landed(kube, monkeypatch):
    # The write is a PATCH in a worker thread that cancelling cannot stop; if the guard ended first,
    # the restore could read the Service before that PATCH lands and the Service would be left pointing
    # at the shadow about to be deleted. Cancellation must wait for the write.
    original = await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    kube.store.put("pod", pod("tomcat-kt-exchange-x", OURS))
    writing, landed = asyncio.Event(), []

    async def slow_write(*args, **kwargs):
        writing.set()
        await asyncio.sleep(0.2)  # stands for the thread's PATCH still on the wire
        landed.append(True)

    monkeypatch.setattr(takeover, "update_with_retry", slow_write)
    guard = asyncio.create_task(takeover.guard_selector(kube, "default", "tomcat", OURS, original, "alice",
                                                        interval=0.01))
    kube.store.patch("service", "tomcat", "default", {"spec": {"selector": {"kt-role": None, "kt-target": None,
                                                                            "app": "hijack"}}})
    await asyncio.wait_for(writing.wait(), 5)
    guard.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guard
    assert landed == [True]


async def test_guard_survives_an_unexpected_error(kube, monkeypatch, caplog):
    original = await takeover.switch_selector(kube, "default", "tomcat", OURS, "alice")
    calls = []

    async def odd_read(*args, **kwargs):
        calls.append(1)
        raise ValueError("an odd answer")

    monkeypatch.setattr(takeover, "read", odd_read)
    guard = asyncio.create_task(takeover.guard_selector(kube, "default", "tomcat", OURS, original, "alice",
                                                        interval=0.01))
    await asyncio.sleep(0.1)
    assert not guard.done() and len(calls) > 1  # still polling after the error
    guard.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guard


# ------------------------------------------------------------------------------------------------ lock
async def test_lock_acquire_release(kube, caplog):
    caplog.set_level(logging.INFO, logger="ktproxy")
    async with lock.service_lock(kube, "default", "tomcat"):
        assert svc(kube)["metadata"]["annotations"]["kt-lock"] == str(int(NOW.timestamp()))
    assert "annotations" not in svc(kube)["metadata"]
    messages = [r.getMessage() for r in caplog.records]
    assert "Service tomcat locked" in messages and "Service tomcat unlocked" in messages


async def test_fresh_lock_waits_then_fails_stale_lock_is_taken(kube, caplog):
    caplog.set_level(logging.INFO, logger="ktproxy")
    held = str(int(NOW.timestamp()) - 60)
    kube.store.patch("service", "tomcat", "default", {"metadata": {"annotations": {"kt-lock": held}}})
    with pytest.raises(KtError, match=r"^failed to obtain kt lock of service tomcat, please try again later$"):
        await lock.acquire(kube, "default", "tomcat", tries=3, retry_interval=0)
    waiting = "Another user is occupying service tomcat, waiting for lock ..."
    waits = [r for r in caplog.records if r.getMessage() == waiting]
    assert len(waits) == 3
    kube.now = NOW.replace(minute=3)  # 240 s after the lock was taken at 11:59: stale
    await lock.acquire(kube, "default", "tomcat", tries=1, retry_interval=0)
    assert svc(kube)["metadata"]["annotations"]["kt-lock"] == str(int(kube.now.timestamp()))


async def test_lock_conflict_retries(kube):
    kube.store.conflicts = 2
    await lock.acquire(kube, "default", "tomcat", tries=3, retry_interval=0)
    assert "kt-lock" in svc(kube)["metadata"]["annotations"]


async def test_lock_released_when_setup_fails(kube):
    with pytest.raises(RuntimeError):
        async with lock.service_lock(kube, "default", "tomcat"):
            raise RuntimeError("set-up failed")
    assert "annotations" not in svc(kube)["metadata"]
