"""Releasing the kt-lock drops only the lock we wrote: a set-up that outlived STALE_AFTER was overtaken
(as kt-connect does, a lock older than 180 s is taken over), and its late release must leave the new
holder's lock in place. `recover` and `clean` still drop whatever lock there is."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from fake_kube import NOW, FakeKube, service

from ktproxy.exchange import lock

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]


@pytest.fixture
def kube() -> FakeKube:
    k = FakeKube()
    k.store.put("service", service("tomcat", {"app": "tomcat"}, PORTS))
    return k


def held(kube: FakeKube) -> str | None:
    return (kube.store.get("service", "default", "tomcat")["metadata"].get("annotations") or {}).get("kt-lock")


async def test_a_late_release_leaves_the_lock_of_the_one_who_took_it_over(kube: FakeKube, kt_log) -> None:
    other = FakeKube(kube.store)
    other.now = NOW + timedelta(seconds=lock.STALE_AFTER + 60)  # our set-up ran past the stale limit
    theirs = str(int(other.now.timestamp()))
    async with lock.service_lock(kube, "default", "tomcat"):
        assert held(kube) == str(int(NOW.timestamp()))
        await lock.acquire(other, "default", "tomcat", tries=1, retry_interval=0)
        assert held(kube) == theirs
    assert held(kube) == theirs
    assert any("no longer ours" in r.getMessage() for r in kt_log.records)


async def test_release_of_our_own_lock_retries_a_conflicting_write(kube: FakeKube) -> None:
    async with lock.service_lock(kube, "default", "tomcat"):
        kube.store.conflicts = 2  # a heartbeat or a selector change lands between our read and our write
    assert held(kube) is None


async def test_acquire_returns_the_value_it_wrote(kube: FakeKube) -> None:
    value = await lock.acquire(kube, "default", "tomcat", tries=1, retry_interval=0)
    assert value == held(kube) == str(int(NOW.timestamp()))
    assert await lock.release(kube, "default", "tomcat", held="1") is False  # not ours: kept
    assert held(kube) == value
    assert await lock.release(kube, "default", "tomcat", held=value) is True
    assert held(kube) is None


async def test_a_forced_release_drops_any_lock(kube: FakeKube, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ktproxy")
    kube.store.patch("service", "tomcat", "default", {"metadata": {"annotations": {"kt-lock": "12345"}}})
    assert await lock.release(kube, "default", "tomcat") is True  # recover / clean: whoever wrote it
    assert held(kube) is None
    kube.store.delete("service", "tomcat", "default")
    assert await lock.release(kube, "default", "tomcat", held="12345") is False


async def test_clean_drops_a_lock_younger_than_stale_after_when_its_threshold_says_so(kube: FakeKube) -> None:
    # Found by the fault suite: an exchange SIGKILLed between locking and its shadow, then `ktctl clean
    # --threshold-in-minutes 0`: pod and Secret went, the kt-lock stayed for STALE_AFTER (180 s).
    from ktproxy.cleanup import recover

    value = await lock.acquire(kube, "default", "tomcat", tries=1, retry_interval=0)
    later = NOW + timedelta(seconds=10)
    assert await recover.clean_hook(kube, "default", later, 300, dry_run=False) == []  # default: kept
    assert held(kube) == value
    assert await recover.clean_hook(kube, "default", later, 0, dry_run=False) == [
        "remove stale kt-lock of service default/tomcat"]
    ann = kube.store.get("service", "default", "tomcat")["metadata"].get("annotations") or {}
    assert "kt-lock" not in ann and lock.KT_LOCK_OWNER not in ann
