"""TARGET resolution for exchange (service / deployment) and forward (service, pod, address), including
re-resolution of a service's Ready pods when one is replaced."""

from __future__ import annotations

import re

import pytest
from fake_kube import FakeKube, deployment, pod, service

from ktproxy.errors import KtError, UsageError
from ktproxy.exchange.target import resolve_exchange_target
from ktproxy.forward.targets import AddressPlan, PodPlan, ServicePlan, resolve_forward

PORTS = [{"name": "http", "port": 8080, "targetPort": 8080}]


@pytest.fixture
def kube():
    k = FakeKube()
    k.store.put("service", service("tomcat", {"app": "tomcat"}, PORTS))
    k.store.put("deployment", deployment("tomcat", {"app": "tomcat", "tier": "web"}))
    return k


@pytest.mark.parametrize("text,kind", [
    ("tomcat", "service"), ("svc/tomcat", "svc"), ("service/tomcat", "service"),
])
async def test_exchange_service_spellings(kube, text, kind):
    t = await resolve_exchange_target(kube, "default", text)
    assert (t.kind, t.service_name, t.deployment) == (kind, "tomcat", None)


async def test_exchange_deployment_finds_the_service_selecting_it(kube):
    kube.store.put("service", service("unrelated", {"app": "other"}, PORTS))
    t = await resolve_exchange_target(kube, "default", "deploy/tomcat")
    assert (t.kind, t.service_name, t.deployment.metadata.name) == ("deploy", "tomcat", "tomcat")


async def test_exchange_deployment_finds_a_taken_over_service_and_maps_stuntman_back():
    kube = FakeKube()
    kube.store.put("deployment", deployment("api", {"app": "api"}))
    # mesh: the original selects the router, kt-connect's stuntman copy selects the app
    kube.store.put("service", service("api", {"kt-role": "router"}, PORTS,
                                      annotations={"kt-selector": '{"app":"api"}'}))
    kube.store.put("service", service("api-kt-stuntman", {"app": "api"}, PORTS))
    t = await resolve_exchange_target(kube, "default", "deployment/api")
    assert t.service_name == "api"


async def test_exchange_errors(kube):
    with pytest.raises(KtError, match=r"^service 'nope' is not found in namespace default$"):
        await resolve_exchange_target(kube, "default", "nope")
    with pytest.raises(KtError, match=r"^namespace elsewhere not found$"):
        await resolve_exchange_target(kube, "elsewhere", "tomcat")
    with pytest.raises(KtError, match=r"^deployment 'nope' is not found in namespace default$"):
        await resolve_exchange_target(kube, "default", "deployment/nope")
    with pytest.raises(UsageError, match="cannot exchange 'pod/x'"):
        await resolve_exchange_target(kube, "default", "pod/x")
    kube.store.put("deployment", deployment("lonely", {"app": "lonely"}))
    with pytest.raises(KtError, match="no service in namespace default selects the pods of deployment 'lonely'"):
        await resolve_exchange_target(kube, "default", "deployment/lonely")


async def test_forward_service_follows_pod_replacement(kube):
    kube.store.put("pod", pod("tomcat-a", {"app": "tomcat"}, ip="10.244.0.5"))
    kube.store.put("pod", pod("tomcat-b", {"app": "tomcat"}, ip="10.244.0.6", ready=False))
    kube.store.put("pod", pod("tomcat-c", {"app": "tomcat"}, ip="10.244.0.7", deleting=True))
    plan = await resolve_forward(kube, "default", "tomcat", None, ttl=60)
    assert isinstance(plan, ServicePlan) and (plan.remote_port, plan.default_local_port) == (8080, 8080)
    assert await plan.endpoints() == [("10.244.0.5", 8080)]
    kube.store.delete("pod", "tomcat-a", "default")
    kube.store.put("pod", pod("tomcat-d", {"app": "tomcat"}, ip="10.244.0.8"))
    assert await plan.endpoints() == [("10.244.0.5", 8080)]  # cached for ttl
    plan.invalidate()  # what a failed dial does
    assert await plan.endpoints() == [("10.244.0.8", 8080)]
    kube.store.delete("pod", "tomcat-d", "default")
    plan.invalidate()
    with pytest.raises(KtError, match="no Ready pod behind service 'tomcat'"):
        await plan.endpoints()


async def test_forward_named_target_port_is_resolved_per_pod():
    kube = FakeKube()
    kube.store.put("service", service("api", {"app": "api"}, [{"name": "web", "port": 80, "targetPort": "http"}]))
    for name, ip, number in (("api-1", "10.244.0.5", 8080), ("api-2", "10.244.0.6", 9090)):
        kube.store.put("pod", pod(name, {"app": "api"}, ip=ip, ports=[{"name": "http", "containerPort": number}]))
    plan = await resolve_forward(kube, "default", "svc/api", "http", ttl=0)
    assert sorted(await plan.endpoints()) == [("10.244.0.5", 8080), ("10.244.0.6", 9090)]
    assert plan.remote_port == 80


async def test_forward_multi_port_service_needs_remote():
    kube = FakeKube()
    kube.store.put("service", service("two", {"app": "two"}, [
        {"name": "http", "port": 80, "targetPort": 8080}, {"name": "grpc", "port": 9090, "targetPort": 9090}]))
    with pytest.raises(UsageError) as err:
        await resolve_forward(kube, "default", "two", None)
    assert str(err.value) == ("service 'two' has several ports, choose one with LOCAL:REMOTE "
                              "(ports: 80->8080/http, 9090->9090/grpc)")
    plan = await resolve_forward(kube, "default", "two", 9090)
    assert plan.remote_port == 9090
    with pytest.raises(KtError, match="port 81 is not a port of service 'two'"):
        await resolve_forward(kube, "default", "two", 81)


async def test_forward_selectorless_service_dials_cluster_ip():
    kube = FakeKube()
    kube.store.put("service", service("ext", None, [{"port": 5432, "targetPort": 5432}]))
    plan = await resolve_forward(kube, "default", "ext", None)
    assert await plan.endpoints() == [("10.96.0.50", 5432)]


async def test_forward_pod(kube):
    kube.store.put("pod", pod("web-1", {"app": "w"}, ip="10.244.1.1", ports=[{"name": "http", "containerPort": 80}]))
    plan = await resolve_forward(kube, "default", "pod/web-1", None, ttl=0)
    assert isinstance(plan, PodPlan) and await plan.endpoints() == [("10.244.1.1", 80)]
    assert (await resolve_forward(kube, "default", "pod/web-1", "http")).remote_port == 80
    with pytest.raises(KtError, match="declares no port named 'grpc'"):
        await resolve_forward(kube, "default", "pod/web-1", "grpc")
    kube.store.delete("pod", "web-1", "default")
    with pytest.raises(KtError, match="pod 'web-1' is gone"):
        await plan.endpoints()
    with pytest.raises(KtError, match=r"^pod 'nope' is not found in namespace default$"):
        await resolve_forward(kube, "default", "pod/nope", 80)


@pytest.mark.parametrize("target,host", [
    ("10.244.0.9", "10.244.0.9"), ("[fd00::1]", "fd00::1"), ("tomcat.default.svc.cluster.local", None),
])
async def test_forward_address(kube, target, host):
    plan = await resolve_forward(kube, "default", target, 8080)
    assert isinstance(plan, AddressPlan)
    assert await plan.endpoints() == [(host or target, 8080)]
    with pytest.raises(UsageError, match=re.escape(f"a port must be specified because '{target}'")):
        await resolve_forward(kube, "default", target, None)


async def test_forward_bad_kind(kube):
    with pytest.raises(UsageError, match="cannot forward to 'deployment/x'"):
        await resolve_forward(kube, "default", "deployment/x", 80)
    with pytest.raises(UsageError, match="a service name or target address must be specified"):
        await resolve_forward(kube, "default", " ", 80)
