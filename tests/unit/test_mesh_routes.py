"""The router's route list (kt-mesh-routes + kt-ref-count) changed one route at a time, each write guarded
by the resourceVersion it was computed from and retried when another writer came first (kt-connect's
GET+Update of kt-ref-count had no retry: a lost update, its fault d)."""

from __future__ import annotations

import pytest
from fake_kube import FakeKube, pod

from ktproxy.errors import KtError
from ktproxy.mesh.routes import add_route, remove_route, routes_of, routes_patch, with_route, without_value

ROUTER = "tomcat-kt-router"


def _router(kube: FakeKube, routes: str | None = None, deleting: bool = False) -> None:
    ann = {"kt-config": "service=tomcat"}
    if routes is not None:
        ann["kt-mesh-routes"] = routes
        ann["kt-ref-count"] = str(len([r for r in routes.split(",") if r]))
    kube.store.put("pod", pod(ROUTER, {"control-by": "kt", "kt-role": "router", "kt-target": "t"},
                              annotations=ann, deleting=deleting))


def _annotations(kube: FakeKube) -> dict[str, str]:
    return kube.store.get("pod", "default", ROUTER)["metadata"]["annotations"]


def test_pure_updates() -> None:
    assert with_route([("version", "a")], ("version", "b")) == [("version", "a"), ("version", "b")]
    assert with_route([("version", "a")], ("version", "a")) == [("version", "a")]
    assert with_route([("env", "a"), ("version", "b")], ("version", "a")) == [("version", "b"), ("version", "a")]
    assert without_value([("version", "a"), ("env", "b")], "a") == [("env", "b")]
    assert routes_patch([("version", "a"), ("version", "b")], "7") == {"metadata": {
        "annotations": {"kt-mesh-routes": "version:a,version:b", "kt-ref-count": "2"}, "resourceVersion": "7"}}
    assert routes_patch([], None) == {"metadata": {"annotations": {"kt-mesh-routes": "", "kt-ref-count": "0"}}}


async def test_add_and_remove_keep_the_count() -> None:
    kube = FakeKube()
    _router(kube, "version:alice")
    assert await add_route(kube, "default", ROUTER, ("version", "bob")) == [("version", "alice"), ("version", "bob")]
    assert _annotations(kube)["kt-mesh-routes"] == "version:alice,version:bob"
    assert _annotations(kube)["kt-ref-count"] == "2"
    assert await remove_route(kube, "default", ROUTER, "alice") == [("version", "bob")]
    assert _annotations(kube)["kt-ref-count"] == "1"
    assert await remove_route(kube, "default", ROUTER, "bob") == []
    assert _annotations(kube)["kt-mesh-routes"] == "" and _annotations(kube)["kt-ref-count"] == "0"


async def test_every_write_carries_the_version_it_read() -> None:
    kube = FakeKube()
    _router(kube, "version:alice")
    version = kube.store.get("pod", "default", ROUTER)["metadata"]["resourceVersion"]
    await add_route(kube, "default", ROUTER, ("version", "bob"))
    (_, _, body), = kube.store.patches
    assert body["metadata"]["resourceVersion"] == version


async def test_a_writer_that_lost_the_race_reads_again_and_keeps_the_others_route() -> None:
    kube = FakeKube()
    _router(kube, "version:alice")
    kube.store.conflicts = 3  # three other writes land between our read and our write
    assert await add_route(kube, "default", ROUTER, ("version", "bob")) == [("version", "alice"), ("version", "bob")]
    assert len(kube.store.patches) == 4
    assert routes_of(kube.store.read("pod", ROUTER, "default")) == [("version", "alice"), ("version", "bob")]


async def test_gives_up_in_one_line_when_the_races_never_end() -> None:
    kube = FakeKube()
    _router(kube, "")
    kube.store.conflicts = 1000
    with pytest.raises(KtError, match="keep changing"):
        await add_route(kube, "default", ROUTER, ("version", "bob"))


@pytest.mark.parametrize("deleting", [False, True])
async def test_no_router_or_one_being_deleted_is_none(deleting: bool) -> None:
    kube = FakeKube()
    if deleting:
        _router(kube, "version:alice", deleting=True)
    assert await add_route(kube, "default", ROUTER, ("version", "bob")) is None
    assert await remove_route(kube, "default", ROUTER, "alice") is None
    assert kube.store.patches == []


async def test_malformed_routes_in_the_annotation_are_dropped_not_half_kept() -> None:
    kube = FakeKube()
    _router(kube, "version:alice,garbage,Version:UP,env:ok")
    assert await add_route(kube, "default", ROUTER, ("version", "bob")) == [
        ("version", "alice"), ("env", "ok"), ("version", "bob")]


async def test_a_router_without_any_annotation_is_an_empty_route_list() -> None:
    kube = FakeKube()
    kube.store.put("pod", pod(ROUTER, {"control-by": "kt", "kt-role": "router", "kt-target": "t"}))
    assert "annotations" not in kube.store.get("pod", "default", ROUTER)["metadata"]
    assert await remove_route(kube, "default", ROUTER, "a") == []
    assert _annotations(kube) == {"kt-mesh-routes": "", "kt-ref-count": "0"}
