"""A small in-memory stand-in for KubeClient (core + apps), enough for the reverse-traffic library code.

Objects are stored as API JSON and handed out as kubernetes client models, as the real client does.
Patches are merged like a strategic merge of maps (None deletes a key); a patch carrying a stale
metadata.resourceVersion fails with 409, as the API server does. `conflicts` makes the next N patches
lose a race (someone else writes first).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiClient

from ktproxy.cluster.errors import KubeError

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
_MODELS = {"service": "V1Service", "pod": "V1Pod", "deployment": "V1Deployment", "secret": "V1Secret"}
_api = ApiClient()


def model(kind: str, obj: dict[str, Any]) -> Any:
    return _api.deserialize(json.dumps(obj), _MODELS[kind], None)


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            into.pop(k, None)
        elif isinstance(v, dict):
            if not isinstance(into.get(k), dict):
                into[k] = {}
            _merge(into[k], v)
        else:
            into[k] = json.loads(json.dumps(v))


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


class _List:
    def __init__(self, items: list[Any]) -> None:
        self.items = items


class Store:
    def __init__(self, namespaces: tuple[str, ...] = ("default",)) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.namespaces = set(namespaces)
        self.version = 100
        self.conflicts = 0
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.changed = asyncio.Event()  # set on every write, for tests that wait for one

    async def until(self, predicate: Any, limit: float = 5.0) -> None:
        """Wait until predicate() holds, re-checking after each write to the store."""
        async with asyncio.timeout(limit):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        md = obj.setdefault("metadata", {})
        md.setdefault("namespace", "default")
        md.setdefault("creationTimestamp", NOW.isoformat())
        self.version += 1
        md["resourceVersion"] = str(self.version)
        self.objects[(kind, md["namespace"], md["name"])] = obj
        self.changed.set()
        return obj

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        try:
            return self.objects[(kind, ns, name)]
        except KeyError:
            raise KubeError(f'{kind}s "{name}" not found', 404, "NotFound") from None

    def read(self, kind: str, name: str, ns: str, **_: Any) -> Any:
        return model(kind, self.get(kind, ns, name))

    def patch(self, kind: str, name: str, ns: str, body: dict[str, Any], **_: Any) -> Any:
        obj = self.get(kind, ns, name)
        self.patches.append((kind, name, body))
        if self.conflicts:
            self.conflicts -= 1
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            raise KubeError("the object has been modified", 409, "Conflict")
        body = json.loads(json.dumps(body))
        body.get("metadata", {}).pop("resourceVersion", None)
        _merge(obj, body)
        for key in ("annotations", "labels"):
            if obj["metadata"].get(key) == {}:
                del obj["metadata"][key]
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.changed.set()
        return model(kind, obj)

    def create(self, kind: str, ns: str, body: dict[str, Any], **_: Any) -> Any:
        name = body["metadata"]["name"]
        if (kind, ns, name) in self.objects:
            raise KubeError(f'{kind}s "{name}" already exists', 409, "AlreadyExists")
        obj = json.loads(json.dumps(body))
        self.version += 1
        obj["metadata"].setdefault("uid", f"uid-{name}-{self.version}")  # each creation its own, as the API's
        return model(kind, self.put(kind, obj))

    def delete(self, kind: str, name: str, ns: str, body: Any = None, **_: Any) -> None:
        obj = self.get(kind, ns, name)
        preconditions = getattr(body, "preconditions", None)
        wanted = getattr(preconditions, "uid", None)
        if wanted is not None and wanted != obj["metadata"].get("uid"):
            raise KubeError(f"Precondition failed: UID in precondition: {wanted}, UID in object meta: "
                            f"{obj['metadata'].get('uid')}", 409, "Conflict")
        del self.objects[(kind, ns, name)]
        self.changed.set()

    def list(self, kind: str, ns: str | None = None, label_selector: str | None = None, **_: Any) -> _List:
        items = [model(kind, o) for (k, n, _name), o in sorted(self.objects.items())
                 if k == kind and (ns is None or n == ns)
                 and _matches(o["metadata"].get("labels") or {}, label_selector)]
        return _List(items)


class _Api:
    """Method names of CoreV1Api/AppsV1Api mapped onto the store."""

    def __init__(self, store: Store, kinds: dict[str, str]) -> None:
        self._store = store
        self._kinds = kinds  # client spelling -> kind

    def __getattr__(self, attr: str) -> Any:
        s = self._store
        for spelled, kind in self._kinds.items():
            if attr == f"read_namespaced_{spelled}":
                return lambda name, ns, **kw: s.read(kind, name, ns, **kw)
            if attr == f"patch_namespaced_{spelled}":
                return lambda name, ns, body, **kw: s.patch(kind, name, ns, body, **kw)
            if attr == f"create_namespaced_{spelled}":
                return lambda ns, body, **kw: s.create(kind, ns, body, **kw)
            if attr == f"delete_namespaced_{spelled}":
                return lambda name, ns, **kw: s.delete(kind, name, ns, **kw)
            if attr == f"list_namespaced_{spelled}":
                return lambda ns, **kw: s.list(kind, ns, **kw)
            if attr == f"list_{spelled}_for_all_namespaces":
                return lambda **kw: s.list(kind, None, **kw)
        raise AttributeError(attr)


class FakeKube:
    def __init__(self, store: Store | None = None, namespace: str = "default") -> None:
        self.store = store or Store()
        self.namespace = namespace
        self.now = NOW
        self.core = _Api(self.store, {"service": "service", "pod": "pod", "secret": "secret"})
        self.apps = _Api(self.store, {"deployment": "deployment"})

    async def call(self, fn: Any, *args: Any, access: Any = None, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    async def cluster_time(self) -> datetime:
        return self.now

    async def check_namespace(self, namespace: str | None = None) -> None:
        if (namespace or self.namespace) not in self.store.namespaces:
            raise KubeError(f"namespace {namespace} not found", 404, "NotFound")


# ---------------------------------------------------------------------------------------- builders
def service(name: str, selector: dict[str, str] | None, ports: list[dict[str, Any]], ns: str = "default",
            annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        md["annotations"] = dict(annotations)
    if labels:
        md["labels"] = dict(labels)
    spec: dict[str, Any] = {"ports": ports, "clusterIP": "10.96.0.50", "type": "ClusterIP"}
    if selector is not None:
        spec["selector"] = dict(selector)
    return {"metadata": md, "spec": spec}


def pod(name: str, labels: dict[str, str], ip: str = "10.244.0.9", ready: bool = True,
        ports: list[dict[str, Any]] | None = None, ns: str = "default",
        annotations: dict[str, str] | None = None, deleting: bool = False) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns, "labels": dict(labels)}
    if annotations:
        md["annotations"] = dict(annotations)
    if deleting:
        md["deletionTimestamp"] = NOW.isoformat()
    return {
        "metadata": md,
        "spec": {"containers": [{"name": "c", "image": "x", "ports": ports or []}]},
        "status": {"phase": "Running" if ready else "Pending", "podIP": ip if ready else None,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def deployment(name: str, labels: dict[str, str], replicas: int = 1, ns: str = "default",
               annotations: dict[str, str] | None = None, ready: int | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        md["annotations"] = dict(annotations)
    return {
        "metadata": md,
        "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)},
                              "spec": {"containers": [{"name": "c", "image": "x"}]}}},
        "status": {"readyReplicas": replicas if ready is None else ready},
    }
