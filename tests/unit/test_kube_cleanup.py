"""Stale-object decisions, age formatting, discovery parsing, status table (no cluster needed)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from kube_fake import fake_kube
from kubernetes.client import Configuration

from ktproxy.cleanup.sweep import clean
from ktproxy.cluster.client import KubeClient
from ktproxy.cluster.discovery import ClusterInfo, covering, parse_service_range_error
from ktproxy.cluster.heartbeat import heartbeat_patch
from ktproxy.cluster.kinds import KINDS, kind_api
from ktproxy.cluster.kt_objects import DEFAULT_THRESHOLD, KtObject, fmt_age, stale
from ktproxy.commands.status import render

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _obj(name, hb_ago=None, created_ago=3600.0, kind="pod"):
    return KtObject(
        kind=kind,
        namespace="ns",
        name=name,
        role="shadow-connect",
        user="alice",
        created=NOW - timedelta(seconds=created_ago),
        heartbeat=int(NOW.timestamp() - hb_ago) if hb_ago is not None else None,
    )


def test_stale_uses_heartbeat_else_creation():
    fresh = _obj("fresh", hb_ago=30)
    old = _obj("old", hb_ago=301)
    never_new = _obj("never-new", hb_ago=None, created_ago=60)
    never_old = _obj("never-old", hb_ago=None, created_ago=600)
    got = stale([fresh, old, never_new, never_old], NOW, 300)
    assert [o.name for o in got] == ["old", "never-old"]


def test_fmt_age():
    assert [fmt_age(x) for x in (None, 5, 119, 120, 3599, 3600, 3660, 86400, 90000)] == [
        "-", "5s", "119s", "2m", "59m", "1h", "1h1m", "1d", "1d1h",
    ]  # fmt: skip


def test_heartbeat_patch_is_epoch_string():
    assert heartbeat_patch(1700000000) == {"metadata": {"annotations": {"kt-last-heart-beat": "1700000000"}}}


def test_parse_service_range_error():
    msg = (
        'Service "kt-cidr-probe-x" is invalid: spec.clusterIPs: Invalid value: ["203.0.113.254"]: failed to '
        "allocate IP 203.0.113.254: the provided IP (203.0.113.254) is not in the valid range. The range of "
        "valid IPs is 10.96.0.0/12"
    )
    assert parse_service_range_error(msg) == [ipaddress.ip_network("10.96.0.0/12")]
    assert parse_service_range_error("something else") == []


def test_covering_and_cidrs():
    nets = covering(["10.244.0.5", "10.244.3.9", "10.250.0.1", "127.0.0.1", "fd00::5", "junk"])
    assert [str(n) for n in nets] == ["10.244.0.0/16", "10.250.0.0/16", "fd00::/64"]
    info = ClusterInfo(
        service_cidrs=[ipaddress.ip_network("10.96.0.0/16")],
        pod_cidrs=[ipaddress.ip_network("10.244.0.0/24"), ipaddress.ip_network("10.244.0.0/16")],
    )
    assert [str(n) for n in info.cidrs] == ["10.96.0.0/16", "10.244.0.0/16"]


def test_status_table():
    lines = render([_obj("a", hb_ago=30), _obj("b", hb_ago=4000, kind="secret")], NOW, show_user=False)
    assert lines[0].split() == ["NAMESPACE", "KIND", "NAME", "ROLE", "AGE", "HEARTBEAT", "STATE"]
    assert lines[1].split() == ["ns", "pod", "a", "shadow-connect", "1h", "30s", "ago", "active"]
    assert lines[2].split() == ["ns", "secret", "b", "shadow-connect", "1h", "1h6m", "ago", "stale"]


def test_status_calls_stale_what_clean_would_delete():
    objs = [_obj("edge", hb_ago=DEFAULT_THRESHOLD), _obj("over", hb_ago=DEFAULT_THRESHOLD + 1)]
    states = [line.split()[-1] for line in render(objs, NOW, show_user=False)[1:]]
    assert states == ["stale" if o in stale(objs, NOW) else "active" for o in objs] == ["active", "stale"]


def test_every_kind_has_its_client_calls():
    kube = KubeClient(Configuration(), "ns")
    for kind in KINDS:
        api = kind_api(kube, kind)
        assert all(callable(api.namespaced(verb)) for verb in ("patch", "delete", "list", "read"))
        assert callable(api.list_everywhere)


def _listing_kube():
    kube, _ = fake_kube("team")

    def empty(*_a, **_kw):
        return SimpleNamespace(items=[])

    stems = ["pod", "secret", "service", "config_map"]
    kube.core = SimpleNamespace(**{f"list_namespaced_{s}": empty for s in stems})
    kube.apps = SimpleNamespace(list_namespaced_deployment=empty)
    return kube


async def test_clean_runs_the_recover_hooks_it_is_given():
    seen = []

    async def hook(kube, namespace, now, threshold, dry_run):
        seen.append((namespace, threshold, dry_run))
        return ["Would restore the selector of service team/tomcat"]

    result = await clean(_listing_kube(), "team", threshold=60, dry_run=True, hooks=[hook])
    assert seen == [("team", 60, True)]
    assert result.recovered == ["Would restore the selector of service team/tomcat"]


def test_clean_command_registers_its_hooks_explicitly(monkeypatch, capsys):
    """No global registry that works only if the right module happens to be imported: `ktctl clean`
    hands clean() the hooks cleanup/sweep.py lists."""
    import ktproxy.commands.clean as clean_cmd
    from ktproxy.cleanup import sweep

    async def hook(kube, namespace, now, threshold, dry_run):
        return [f"Restored service {namespace}/tomcat"]

    monkeypatch.setattr(sweep, "recover_hooks", lambda: [hook])
    monkeypatch.setattr(clean_cmd, "in_scope", lambda args, work: asyncio.run(work(_listing_kube(), "team")))
    assert clean_cmd.run(argparse.Namespace(threshold=5, dry_run=False)) == 0
    assert "Restored service team/tomcat" in capsys.readouterr().out


def test_clean_command_restores_what_a_dead_exchange_changed():
    # Without this hook `ktctl clean` deleted a killed exchange's shadow and left its Service selecting
    # nothing (the e2e test_sigkill_then_clean shows the user's side).
    from ktproxy.cleanup import recover, sweep
    from ktproxy.mesh import clean as mesh_clean

    assert recover.clean_hook in sweep.recover_hooks()
    assert mesh_clean.clean_hook in sweep.first_hooks()


async def test_connects_start_up_sweep_runs_the_same_hooks(monkeypatch):
    # connect's sweep ran clean() without hooks: it deleted a killed exchange's stale shadow and left the
    # Service selecting nothing, and a dead mesh participant's route in the router.
    from ktproxy.cleanup import sweep

    seen = []

    async def hook(kube, namespace, now, threshold, dry_run):
        seen.append(namespace)
        return []

    monkeypatch.setattr(sweep, "recover_hooks", lambda: [hook])
    monkeypatch.setattr(sweep, "first_hooks", lambda: [hook])
    await sweep.start_up_sweep(_listing_kube(), "team")
    assert seen == ["team", "team"]
