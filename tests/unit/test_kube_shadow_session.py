"""The shadow's life against an in-memory API (kube_fake): creates cancelled in flight, the heartbeat,
pod replacement shared by callers, and close that never stops half-way (review R7)."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from kube_fake import FakeCore, api_exception, fake_kube

from ktproxy.cluster import heartbeat
from ktproxy.cluster.errors import KubeError
from ktproxy.shadow.pod import ShadowOptions, ShadowRole, create_shadow
from ktproxy.shadow.session import ShadowSession
from ktproxy.tunnel.keys import generate_session_keys

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKtest session"
HOST = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


async def _until(predicate, what: str) -> None:
    try:
        async with asyncio.timeout(5):
            # Polled: the state lives in the fake's worker threads, which have no asyncio event to set.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.mark.parametrize("call", ["create_namespaced_secret", "create_namespaced_pod"])
async def test_create_cancelled_in_flight_is_deleted_once_it_lands(call):
    """R7: Ctrl-C while the POST is in its worker thread; the object appears afterwards and is removed."""
    kube, core = fake_kube()
    core.hold[call] = held = threading.Event()
    task = asyncio.ensure_future(create_shadow(kube, ShadowOptions(namespace="team"), PUB, HOST, name="p"))
    await _until(lambda: call in core.started, call)
    task.cancel()
    await asyncio.sleep(0.05)  # the caller has given up; the request is still on the wire
    held.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The POST completes in its thread whatever the caller did: judge only once it has.
    assert await asyncio.to_thread(core.finished.setdefault(call, threading.Event()).wait, 5)
    assert core.objects == {}, "an object whose create was sent must not outlive the cancellation"
    assert ("delete_namespaced_secret", "p") in core.calls


async def test_refused_create_deletes_nothing_of_that_name():
    """A name the API server refused (409) may be someone else's object: it is not deleted."""
    kube, core = fake_kube()
    core.objects[("secret", "p")] = {"metadata": {"name": "p"}}  # another session's secret
    with pytest.raises(KubeError, match="already exists"):
        await create_shadow(kube, ShadowOptions(namespace="team"), PUB, HOST, name="p")
    assert core.names("secret") == ["p"]
    assert core.count("delete_namespaced_secret") == 0


async def test_heartbeat_survives_any_exception(monkeypatch, caplog):
    """R7: an odd response (ValueError, say) must not end the loop: the pod would be swept as stale."""
    kube, core = fake_kube()
    rounds = 0

    async def flaky_time():
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise ValueError("bad Date header")
        return await original()

    original = kube.cluster_time
    kube.cluster_time = flaky_time
    caplog.set_level(logging.WARNING, logger="ktproxy")
    task = asyncio.ensure_future(heartbeat.heartbeat_loop(kube, lambda: [("pod", "team", "p")], interval=0.01))
    try:
        await _until(lambda: core.count("patch_namespaced_pod") >= 1 or task.done(), "a beat after the error")
        assert not task.done(), task.exception()
    finally:
        task.cancel()
    assert any("heartbeat failed: bad Date header" in r.getMessage() for r in caplog.records)


async def test_cluster_time_falls_back_on_an_odd_date_header(monkeypatch):
    from ktproxy.cluster.client import KubeClient

    class Resp:
        def __init__(self):
            self.headers = {"Date": "not a date"}

        def drain_conn(self): ...

        def release_conn(self): ...

    kube, _ = fake_kube()

    async def call(fn, *a, **kw):
        return Resp()

    monkeypatch.setattr(kube, "call", call)
    when = await KubeClient.cluster_time(kube)
    assert when.tzinfo is not None


def _session() -> tuple[ShadowSession, FakeCore]:
    kube, core = fake_kube()
    session = ShadowSession(kube, "team", ShadowOptions(namespace="ignored", user="u"), generate_session_keys())
    return session, core


async def test_session_takes_typed_options_and_its_namespace():
    session, core = _session()
    await session.start(timeout=5)
    assert session.options.namespace == "team" and session.options.ready_timeout == 5
    assert core.names("pod") == [session.pod.name] and session.pod.name.startswith("kt-connect-shadow-")
    assert await session.close() is True
    assert core.objects == {}


async def test_replacement_survives_a_caller_that_gives_up():
    """A dial's deadline must not abort the new pod's creation (which would delete it) nor start a second."""
    session, core = _session()
    await session.start(timeout=30)
    first = session.pod.name
    core.objects.pop(("pod", first))  # someone deleted the pod
    core.ready = False
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session._replace_pod(), 0.3)
    assert core.count("create_namespaced_pod") == 2
    core.ready = True
    await session._replace_pod()  # a later caller joins the creation under way
    await _until(lambda: session.pod is not None and session.pod.name != first, "the new pod adopted")
    assert core.count("create_namespaced_pod") == 2
    assert core.names("pod") == [session.pod.name]
    await session.close()


async def test_swept_pod_comes_back_and_the_owner_hears_of_it():
    """G3, connect and forward: after a sleep the sweep deleted the pod and its Secret; the next reconnect
    creates both again (all these commands own) and tells the owners (exchange's scale mode re-asserts)."""
    session, core = _session()
    heard: list[heartbeat.Lost] = []

    async def on_lost(lost: heartbeat.Lost) -> None:
        heard.append(lost)

    session.on_lost.append(on_lost)
    await session.start(timeout=30)
    first = session.pod.name
    core.objects.pop(("pod", first))  # `ktctl clean` after the laptop slept
    core.objects.pop(("secret", first))
    assert not await session._pod_usable()
    await session._replace_pod()  # what connect() does before the SSH dial
    assert session.pod.name != first and core.names("pod") == [session.pod.name]
    assert core.names("secret") == [session.pod.secret]
    await _until(lambda: bool(heard), "the owner told")
    assert heard[0].gone == [("pod", "team", first)]
    await session.close()


async def test_close_runs_every_step_and_names_clean(caplog):
    """R7: a failing pod delete neither skips the Secret's delete nor escapes; the user hears of clean."""
    session, core = _session()
    await session.start(timeout=5)
    name = session.pod.name
    core.fail["delete_namespaced_pod"] = api_exception(500, "InternalError", "etcd is sad")
    caplog.set_level(logging.WARNING, logger="ktproxy")
    assert await session.close() is False
    assert ("delete_namespaced_secret", name) in core.calls
    assert core.names("secret") == []
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"could not delete pod team/{name}" in w and "ktctl clean" in w for w in warning), warning


async def test_close_deletes_even_when_the_heartbeat_task_failed():
    session, core = _session()
    await session.start(timeout=5)

    async def broken():
        raise RuntimeError("boom")

    session._heartbeat.cancel()
    session._heartbeat = asyncio.ensure_future(broken())
    await asyncio.sleep(0)
    assert await session.close() is True
    assert core.objects == {}


async def test_close_during_creation_leaves_nothing():
    session, core = _session()
    core.ready = False
    start = asyncio.ensure_future(session.start(timeout=30))
    await _until(lambda: core.count("read_namespaced_pod") >= 1, "the readiness wait")
    assert await session.close() is True
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert core.objects == {}


LAPTOP_READY = ShadowRole(role="shadow-exchange", name_prefix="tomcat-kt-exchange-",
                          ports=(("http", 8080), ("kt-health", 2280)), health_port="kt-health")


async def test_a_shadow_ready_only_with_the_laptop_is_usable_once_started():
    """Its readiness waits for the laptop, which attaches only after start() returns: waiting for Ready
    there would never end, and a reconnect would replace a healthy pod that is merely not Ready."""
    kube, core = fake_kube()
    core.ready = False
    core.container_started = False
    session = ShadowSession(kube, "team", ShadowOptions(namespace="team"), generate_session_keys(),
                            role=LAPTOP_READY)
    start = asyncio.ensure_future(session.start(timeout=30))
    await _until(lambda: core.count("read_namespaced_pod") >= 1, "the start-up wait")
    assert not start.done()
    core.container_started = True
    await asyncio.wait_for(start, 5)
    assert session.pod.name.startswith("tomcat-kt-exchange-")
    assert await session._pod_usable()  # started, not Ready: no replacement on reconnect
    await session.close()
    assert core.objects == {}
