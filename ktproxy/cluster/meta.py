"""Label and annotation names on cluster objects, spelled as kt-connect spells them.

Keeping kt-connect's names means `clean` and `status` (and people's kubectl habits, e.g.
`kubectl get pods -l control-by=kt`) work the same, and all state lives on the objects themselves.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import string

from ktproxy.errors import UsageError

# labels
CONTROL_BY = "control-by"
KT = "kt"  # value of control-by on every object ktproxy creates
KT_ROLE = "kt-role"
KT_TARGET = "kt-target"
KT_NAME = "kt-name"

# annotations
KT_CONFIG = "kt-config"
KT_SELECTOR = "kt-selector"
KT_REF_COUNT = "kt-ref-count"
KT_LOCK = "kt-lock"
KT_LAST_HEART_BEAT = "kt-last-heart-beat"
KT_USER = "kt-user"

# kt-role values
ROLE_CONNECT_SHADOW = "shadow-connect"
ROLE_EXCHANGE_SHADOW = "shadow-exchange"
ROLE_MESH_SHADOW = "shadow-mesh"
ROLE_PREVIEW_SHADOW = "shadow-preview"  # kt-connect v0.3.x's value: each tool recognises the other's objects
ROLE_ROUTER = "router"

SHADOW_PREFIX = "kt-connect-shadow-"
SELECTOR = f"{CONTROL_BY}={KT}"

# IANA_SVC_NAME, what Kubernetes accepts as a port name: at most 15 characters, a letter somewhere,
# no leading, trailing or doubled hyphen.
_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def is_port_name(text: str) -> bool:
    return bool(_PORT_NAME.match(text))


_ALPHABET = string.ascii_lowercase + string.digits


def random_suffix(n: int = 5) -> str:
    """n random lowercase letters/digits (a valid DNS-1123 label tail)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def local_user() -> str:
    """The laptop user's name, for the kt-user annotation (status shows only the caller's objects)."""
    for env in ("KTCTL_USER", "USER", "USERNAME"):
        if os.environ.get(env):
            return os.environ[env]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a bare container
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def parse_kv_list(text: str | None, flag: str = "") -> dict[str, str]:
    """'k1=v1,k2=v2' -> {'k1': 'v1', 'k2': 'v2'} (also accepts ':' as kt-connect did); errors name the flag."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        sep = "=" if "=" in item else (":" if ":" in item else None)
        if sep is None:
            raise UsageError(f"{flag or 'value'} expects key=value[,key=value...], got {item!r}")
        key, value = item.split(sep, 1)
        key, value = key.strip(), value.strip()
        if not key:
            raise UsageError(f"{flag or 'value'} has an empty key in {item!r}")
        out[key] = value
    return out


def parse_pod_quota(text: str | None) -> dict[str, str]:
    """'500m,512Mi' -> {'cpu': '500m', 'memory': '512Mi'}; either part may be empty ('500m' or ',512Mi')."""
    if not text:
        return {}
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2:
        raise UsageError(f"--pod-quota expects CPU,MEMORY (e.g. 500m,512Mi), got {text!r}")
    out: dict[str, str] = {}
    if parts[0]:
        out["cpu"] = parts[0]
    if len(parts) == 2 and parts[1]:
        out["memory"] = parts[1]
    return out
