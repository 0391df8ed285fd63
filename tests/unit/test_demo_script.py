"""`make demo` (tests/demo.sh) never deletes what it did not create, and says why it stops.

kubectl is a fake here (a script on PATH answering from a small state file), so the script's decisions are
checked without a cluster; the real run is `make demo`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")

FAKE_KUBECTL = r'''#!PYTHON
import json, os, sys
state_file = os.environ["FAKE_STATE"]
state = json.load(open(state_file))
args = [a for a in sys.argv[1:]]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
kinds = {"deployment": "deploy", "service": "svc", "deployments": "deploy", "services": "svc", "svc": "svc"}

def obj(kind):
    return state.get(kinds.get(kind, kind))

verb = args[0]
if verb == "get" and len(args) > 2 and args[2] == "tomcat":
    o = obj(args[1])
    jsonpath = next((a for a in args if a.startswith("jsonpath=")), "")
    if o is None:
        if "--ignore-not-found" in args:
            sys.exit(0)
        sys.exit("Error from server (NotFound): tomcat not found")
    if "metadata.name" in jsonpath:
        print("tomcat " + ("1" if o.get("demo") else ""), end="")
    elif "image" in jsonpath:
        print(o.get("image", ""), end="")
    elif "selector" in jsonpath:
        print(o.get("selector", "tomcat 8080"), end="")
    sys.exit(0)
if verb in ("create", "expose"):
    key = "deploy" if verb == "create" else "svc"
    if state.get(key) is not None:
        sys.exit(f"Error from server (AlreadyExists): {key} tomcat already exists")
    state[key] = {"image": "tomcat:9"}
    json.dump(state, open(state_file, "w"))
    sys.exit(0)
if verb == "label":
    state[kinds[args[1]]]["demo"] = True
    json.dump(state, open(state_file, "w"))
sys.exit(0)
'''


def run_demo(tmp_path: Path, deploy: dict | None, svc: dict | None) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.replace("PYTHON", sys.executable, 1))
    kubectl.chmod(0o755)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"deploy": deploy, "svc": svc}))
    log = tmp_path / "kubectl.log"
    log.touch()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"),  # ktctl connect fails at once
           "FAKE_STATE": str(state), "FAKE_LOG": str(log)}
    r = subprocess.run(["bash", str(ROOT / "tests" / "demo.sh")], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    return r, log.read_text()


def deletes(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("delete")]


def test_a_foreign_tomcat_is_left_alone_and_the_reason_said(tmp_path: Path) -> None:
    r, log = run_demo(tmp_path, deploy={"image": "example.org/team/tomcat:prod"}, svc={"selector": "tomcat 8080"})
    assert r.returncode != 0
    assert deletes(log) == []
    stops = [line for line in r.stderr.splitlines() if line.startswith("[demo] stopping:")]
    assert len(stops) == 1 and "deployment 'tomcat'" in stops[0] and "did not create" in stops[0], r.stderr
    assert not any(line.startswith(("create", "expose", "exec")) for line in log.splitlines())


def test_a_foreign_demo_image_tomcat_is_reused_not_deleted(tmp_path: Path) -> None:
    # Reused, and the demo still fails later (no cluster for ktctl): its clean-up must not delete it.
    r, log = run_demo(tmp_path, deploy={"image": "tomcat:9"}, svc={"selector": "tomcat 8080"})
    assert "reusing the existing deployment tomcat" in r.stdout
    assert r.returncode != 0
    assert "[demo] stopping: ktctl connect exited" in r.stderr
    assert deletes(log) == []


def test_what_the_demo_created_is_deleted(tmp_path: Path) -> None:
    r, log = run_demo(tmp_path, deploy=None, svc=None)
    assert r.returncode != 0  # ktctl has no cluster here
    assert deletes(log) == ["delete deployment/tomcat service/tomcat --ignore-not-found"]


def test_a_leftover_of_an_earlier_demo_is_its_own(tmp_path: Path) -> None:
    r, log = run_demo(tmp_path, deploy={"image": "tomcat:9", "demo": True}, svc=None)
    assert "reusing" not in r.stdout
    assert deletes(log) == ["delete deployment/tomcat service/tomcat --ignore-not-found"]
