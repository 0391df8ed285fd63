"""Scale mode (which Deployment, the replica record, scale back, the wait), preview's Service (shape and
refusals) and recover / the clean hook (what a killed exchange left, in both modes)."""

from __future__ import annotations

import pytest
from fake_kube import NOW, FakeKube, deployment, pod, service

from ktproxy import preview
from ktproxy.cleanup import recover
from ktproxy.errors import KtError
from ktproxy.exchange import scale, takeover
from ktproxy.expose import ExposedPort

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]


@pytest.fixture
def kube():
    k = FakeKube()
    k.store.put("service", service("tomcat", {"app": "tomcat"}, PORTS))
    k.store.put("deployment", deployment("tomcat", {"app": "tomcat", "pod-template-hash": "x"}, replicas=2))
    k.store.put("deployment", deployment("other", {"app": "other"}))
    return k


def dep(kube, name="tomcat"):
    return kube.store.get("deployment", "default", name)


# ------------------------------------------------------------------------------------------------ scale
async def test_scale_round_trip(kube):
    d = await scale.deployment_for_service(kube, "default", kube.store.read("service", "tomcat", "default"))
    assert d.metadata.name == "tomcat"
    assert scale.shadow_labels(d) == {"app": "tomcat", "pod-template-hash": "x", "kt-role": "shadow-exchange"}
    assert scale.scale_config("tomcat", 2) == "app=tomcat,replicas=2"
    assert await scale.scale_down(kube, "default", d) == 2
    assert dep(kube)["spec"]["replicas"] == 0
    assert dep(kube)["metadata"]["annotations"]["kt-config"] == "replicas=2"
    # a second exchange after a crash finds 0 replicas and keeps the recorded 2
    assert await scale.scale_down(kube, "default", kube.store.read("deployment", "tomcat", "default")) == 2
    await scale.scale_back(kube, "default", "tomcat", 2)
    assert dep(kube)["spec"]["replicas"] == 2 and "annotations" not in dep(kube)["metadata"]


async def test_scale_wait_ready(kube):
    dep(kube)["status"]["readyReplicas"] = 1
    assert await scale.wait_ready(kube, "default", "tomcat", 2, max_wait=0, interval=0) is False
    dep(kube)["status"]["readyReplicas"] = 2
    assert await scale.wait_ready(kube, "default", "tomcat", 2, max_wait=0, interval=0) is True


async def test_no_deployment_behind_service():
    kube = FakeKube()
    kube.store.put("service", service("lonely", {"app": "lonely"}, PORTS))
    with pytest.raises(KtError, match="no deployment in namespace default runs the pods of service 'lonely'"):
        await scale.deployment_for_service(kube, "default", kube.store.read("service", "lonely", "default"))


# ------------------------------------------------------------------------------------------------ preview
PV_PORTS = [ExposedPort(8080, 8080, 8080)]
SEL = {"kt-role": "shadow-preview", "kt-target": "t"}


async def test_preview_service_shape(kube):
    await preview.create_service(kube, "default", "tomcat-v2", PV_PORTS, SEL, "alice", external=True)
    s = kube.store.get("service", "default", "tomcat-v2")
    assert s["spec"]["type"] == "LoadBalancer" and s["spec"]["selector"] == SEL
    assert s["spec"]["ports"] == [{"name": "kt-8080", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]
    assert s["metadata"]["labels"] == {"control-by": "kt", "kt-role": "shadow-preview"}
    assert s["metadata"]["annotations"] == {"kt-user": "alice", "kt-last-heart-beat": str(int(NOW.timestamp()))}


async def test_preview_refuses_a_name_that_is_not_ours(kube):
    with pytest.raises(KtError) as err:
        await preview.create_service(kube, "default", "tomcat", PV_PORTS, SEL, "alice")
    assert str(err.value) == "service 'tomcat' already exists and was not created by ktctl"
    await preview.delete_service(kube, "default", "tomcat")  # never deletes what is not ours
    assert kube.store.get("service", "default", "tomcat")


async def test_preview_live_one_is_refused_stale_one_replaced(kube):
    await preview.create_service(kube, "default", "pv", PV_PORTS, SEL, "alice")
    with pytest.raises(KtError, match="service 'pv' is already previewed by alice"):
        await preview.create_service(kube, "default", "pv", PV_PORTS, SEL, "bob")
    kube.now = NOW.replace(minute=10)
    await preview.create_service(kube, "default", "pv", PV_PORTS, {**SEL, "kt-target": "u"}, "bob")
    assert kube.store.get("service", "default", "pv")["metadata"]["annotations"]["kt-user"] == "bob"
    await preview.delete_service(kube, "default", "pv")
    with pytest.raises(KtError, match="not found"):
        kube.store.get("service", "default", "pv")


async def test_preview_exit_never_deletes_the_preview_that_replaced_ours(kube):
    """Issue 18 G7: Alice's laptop slept, her stale preview was replaced by Bob's; her exit deleted Bob's
    Service (only labels were checked). Only the Service this session created (its UID) goes."""
    alice = await preview.create_service(kube, "default", "pv", PV_PORTS, SEL, "alice")
    kube.now = NOW.replace(minute=10)
    await preview.create_service(kube, "default", "pv", PV_PORTS, {**SEL, "kt-target": "u"}, "bob")
    await preview.delete_service(kube, "default", "pv", alice.metadata.uid)  # alice's clean-up
    bob = kube.store.get("service", "default", "pv")
    assert bob["metadata"]["annotations"]["kt-user"] == "bob"
    await preview.delete_service(kube, "default", "pv", bob["metadata"]["uid"])  # bob's own clean-up
    assert ("service", "default", "pv") not in kube.store.objects


async def test_preview_delete_is_guarded_by_uid_against_a_replacement_after_the_read(kube, monkeypatch):
    """Bob replaces it between Alice's read and her delete: the delete's UID precondition refuses."""
    alice = await preview.create_service(kube, "default", "pv", PV_PORTS, SEL, "alice")
    stale_read = kube.store.read("service", "pv", "default")
    kube.store.delete("service", "pv", "default")
    await preview.create_service(kube, "default", "pv", PV_PORTS, {**SEL, "kt-target": "u"}, "bob")
    monkeypatch.setattr(kube.core, "read_namespaced_service", lambda *_a, **_k: stale_read, raising=False)
    await preview.delete_service(kube, "default", "pv", alice.metadata.uid)
    assert kube.store.get("service", "default", "pv")["metadata"]["annotations"]["kt-user"] == "bob"


# ------------------------------------------------------------------------------------------------ recover
SHADOW = {"control-by": "kt", "kt-role": "shadow-exchange", "kt-target": "abc"}


async def test_recover_after_a_killed_selector_exchange(kube):
    await takeover.switch_selector(kube, "default", "tomcat", {k: SHADOW[k] for k in ("kt-role", "kt-target")},
                                   "alice")
    kube.store.patch("service", "tomcat", "default", {"metadata": {"annotations": {"kt-lock": "1"}}})
    kube.store.put("pod", pod("tomcat-kt-exchange-abcde", SHADOW, annotations={"kt-config": "service=tomcat"}))
    kube.store.put("secret", {"metadata": {"name": "tomcat-kt-exchange-abcde", "labels": SHADOW}})
    kube.store.put("pod", pod("kt-connect-shadow-x", {"control-by": "kt", "kt-role": "shadow-connect"}))
    lines = await recover.recover(kube, "default", "tomcat")
    assert lines == ["Deleted shadow pod tomcat-kt-exchange-abcde", "Removed the kt-lock of service tomcat",
                     'Restored the original selector of service tomcat: {"app":"tomcat"}']
    s = kube.store.get("service", "default", "tomcat")
    assert s["spec"]["selector"] == {"app": "tomcat"} and "annotations" not in s["metadata"]
    remaining = sorted(n for (k, _, n) in kube.store.objects if k in ("pod", "secret"))
    assert remaining == ["kt-connect-shadow-x"]  # connect's shadow is not the exchange's
    tidy = ["Service tomcat is clean and tidy, nothing would be done"]
    assert await recover.recover(kube, "default", "tomcat") == tidy


async def test_recover_after_a_killed_scale_exchange(kube):
    await scale.scale_down(kube, "default", kube.store.read("deployment", "tomcat", "default"))
    labels = {"app": "tomcat", "pod-template-hash": "x", "control-by": "kt", "kt-role": "shadow-exchange"}
    kube.store.put("pod", pod("tomcat-kt-exchange-q", labels, annotations={"kt-config": "app=tomcat,replicas=2"}))
    lines = await recover.recover(kube, "default", "tomcat")
    assert lines == ["Deleted shadow pod tomcat-kt-exchange-q", "Scaled deployment tomcat back to 2"]
    assert dep(kube)["spec"]["replicas"] == 2


async def test_recover_scale_back_from_kt_connect_shadow_record_only(kube):
    """kt-connect records the count only on its shadow; that is enough."""
    dep(kube)["spec"]["replicas"] = 0
    labels = {"app": "tomcat", "control-by": "kt", "kt-role": "shadow-exchange"}
    kube.store.put("pod", pod("tomcat-kt-exchange-k", labels, annotations={"kt-config": "app=tomcat,replicas=3"}))
    await recover.recover(kube, "default", "tomcat")
    assert dep(kube)["spec"]["replicas"] == 3


async def test_recover_unknown_service(kube):
    with pytest.raises(KtError, match="service 'nope' is not found in namespace default"):
        await recover.recover(kube, "default", "nope")


async def test_clean_hook_only_recovers_exchanges_without_a_live_shadow(kube):
    ours = {"kt-role": "shadow-exchange", "kt-target": "abc"}
    await takeover.switch_selector(kube, "default", "tomcat", ours, "alice")
    beat = {"kt-last-heart-beat": str(int(NOW.timestamp()) - 30)}
    kube.store.put("pod", pod("tomcat-kt-exchange-a", {**ours, "control-by": "kt"}, annotations=beat))
    await scale.scale_down(kube, "default", kube.store.read("deployment", "other", "default"))
    now = NOW
    assert await recover.clean_hook(kube, "default", now, 300, dry_run=False) == [
        "scale deployment default/other back to 1 (its exchange is gone)"]
    assert kube.store.get("service", "default", "tomcat")["spec"]["selector"] == ours  # live: untouched
    kube.store.delete("pod", "tomcat-kt-exchange-a", "default")
    assert await recover.clean_hook(kube, "default", now, 300, dry_run=True) == [
        "restore selector of service default/tomcat (its exchange is gone)"]
    assert kube.store.get("service", "default", "tomcat")["spec"]["selector"] == ours  # dry run
    await recover.clean_hook(kube, "default", now, 300, dry_run=False)
    assert kube.store.get("service", "default", "tomcat")["spec"]["selector"] == {"app": "tomcat"}


async def test_changes_lists_switched_selectors_and_scaled_deployments(kube):
    # `ktctl status` shows what an exchange changed on objects ktproxy does not own.
    assert await recover.changes(kube, "default") == []
    ours = {"kt-role": "shadow-exchange", "kt-target": "abc"}
    await takeover.switch_selector(kube, "default", "tomcat", ours, "alice")
    await scale.scale_down(kube, "default", kube.store.read("deployment", "other", "default"))
    assert await recover.changes(kube, "default") == [
        'service default/tomcat: selector switched by alice (original {"app":"tomcat"})',
        "deployment default/other: scaled to 0 by an exchange (was 1)",
    ]


async def test_status_and_clean_checks_skip_what_a_namespaced_user_may_not_list(kube, monkeypatch):
    # The README's minimal Role has no `list` on services or deployments: `ktctl status` and `ktctl clean`
    # must still work for that user (they failed with a 403, clean after it had already deleted things).
    from ktproxy.cluster.errors import KubeError

    ours = {"kt-role": "shadow-exchange", "kt-target": "abc"}
    await takeover.switch_selector(kube, "default", "tomcat", ours, "alice")
    real_call = kube.call

    async def namespaced_user(fn, *args, access=None, **kwargs):
        if access is not None and access.verb == "list" and access.resource in ("services", "deployments.apps"):
            raise KubeError(f"no permission to list {access.resource}", 403, "Forbidden")
        return await real_call(fn, *args, access=access, **kwargs)

    monkeypatch.setattr(kube, "call", namespaced_user)
    assert await recover.changes(kube, "default") == []
    assert await recover.clean_hook(kube, "default", NOW, 300, dry_run=True) == []
