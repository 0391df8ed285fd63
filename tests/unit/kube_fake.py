"""An in-memory stand-in for the API server's pods and secrets behind a real KubeClient.

KubeClient.call still runs each call in a worker thread and maps ApiException to KubeError, so the
thread-and-cancellation behaviour under test is the real one; only the REST layer is replaced.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from ktproxy.cluster.client import KubeClient


def api_exception(status: int, reason: str, message: str) -> ApiException:
    exc = ApiException(status=status, reason=reason)
    exc.body = json.dumps({"kind": "Status", "code": status, "reason": reason, "message": message})
    return exc


class FakeCore:
    """The CoreV1Api calls the shadow code makes. `hold[call]` is an Event the call waits for before it
    acts (a request in flight); `fail[call]` is an ApiException it raises instead of acting."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.hold: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.finished: dict[str, threading.Event] = {}  # the call has acted (or raised)
        self.fail: dict[str, ApiException] = {}
        self.ready = True
        self.container_started = True  # past its startup probe
        self._lock = threading.Lock()

    def _enter(self, call: str, name: str) -> None:
        with self._lock:
            self.calls.append((call, name))
        self.started.setdefault(call, threading.Event()).set()
        if call in self.hold:
            assert self.hold[call].wait(10), f"{call} held for too long"
        if call in self.fail:
            raise self.fail[call]

    def count(self, call: str) -> int:
        return sum(1 for c, _ in self.calls if c == call)

    def _create(self, kind: str, call: str, body: dict[str, Any]) -> Any:
        name = body["metadata"]["name"]
        try:
            self._enter(call, name)
            with self._lock:
                if (kind, name) in self.objects:
                    raise api_exception(409, "AlreadyExists", f'{kind}s "{name}" already exists')
                self.objects[(kind, name)] = body
            return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, uid=f"uid-{name}"))
        finally:
            self.finished.setdefault(call, threading.Event()).set()

    def _delete(self, kind: str, call: str, name: str) -> None:
        self._enter(call, name)
        with self._lock:
            if self.objects.pop((kind, name), None) is None:
                raise api_exception(404, "NotFound", f'{kind}s "{name}" not found')

    def create_namespaced_secret(self, ns: str, body: dict[str, Any]) -> Any:
        return self._create("secret", "create_namespaced_secret", body)

    def create_namespaced_pod(self, ns: str, body: dict[str, Any]) -> Any:
        return self._create("pod", "create_namespaced_pod", body)

    def delete_namespaced_secret(self, name: str, ns: str, **_: Any) -> None:
        self._delete("secret", "delete_namespaced_secret", name)

    def delete_namespaced_pod(self, name: str, ns: str, **_: Any) -> None:
        self._delete("pod", "delete_namespaced_pod", name)

    def patch_namespaced_secret(self, name: str, ns: str, body: dict[str, Any]) -> None:
        self._enter("patch_namespaced_secret", name)

    def patch_namespaced_pod(self, name: str, ns: str, body: dict[str, Any]) -> None:
        self._enter("patch_namespaced_pod", name)

    def read_namespaced_pod(self, name: str, ns: str, **_: Any) -> k8s.V1Pod:
        self._enter("read_namespaced_pod", name)
        if ("pod", name) not in self.objects:
            raise api_exception(404, "NotFound", f'pods "{name}" not found')
        ready = "True" if self.ready else "False"
        return k8s.V1Pod.from_dict({
            "metadata": {"name": name},
            "spec": {"nodeName": "node", "containers": [{"name": "shadow"}]},
            "status": {"phase": "Running", "podIP": "10.244.0.9",
                       "conditions": [{"type": "PodScheduled", "status": "True"},
                                      {"type": "Ready", "status": ready}],
                       "containerStatuses": [{"name": "shadow", "ready": self.ready, "restartCount": 0,
                                              "image": "i", "imageID": "", "started": self.container_started,
                                              "state": {"running": {}}}]},
        })

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.objects if k == kind)


def fake_kube(namespace: str = "team") -> tuple[KubeClient, FakeCore]:
    cfg = k8s.Configuration()
    cfg.host = "https://127.0.0.1:1"
    kube = KubeClient(cfg, namespace)
    core = FakeCore()
    kube.core = core  # type: ignore[assignment]

    async def cluster_time() -> datetime:
        return datetime.now(UTC)

    kube.cluster_time = cluster_time  # type: ignore[method-assign]
    return kube, core
