"""tests/cluster/install-deps.sh (T2): on a fresh Debian machine it installs nodejs, so the PAC parity
tests (tests/unit/test_pac.py) run instead of skipping; it leaves a node from elsewhere alone, and calls
no apt-get at all when everything is there. Run against dpkg-query/apt-get stand-ins on a PATH of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "cluster" / "install-deps.sh"


def run(tmp_path: Path, installed: str, with_node: bool) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("grep"), bin_dir / "grep")
    calls = tmp_path / "apt-calls"
    # dpkg-query -W -f=... PKG: "install ok installed" for the packages listed in $INSTALLED ("*": all)
    (bin_dir / "dpkg-query").write_text(
        '#!/bin/bash\np=${!#}\n'
        '[[ $INSTALLED == "*" || " $INSTALLED " == *" $p "* ]] && echo -n "install ok installed"\nexit 0\n')
    (bin_dir / "apt-get").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    if with_node:
        (bin_dir / "node").write_text("#!/bin/bash\n")
    for f in bin_dir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    res = subprocess.run(["/bin/bash", str(SCRIPT)], env={"PATH": str(bin_dir), "INSTALLED": installed},
                         capture_output=True, text=True, timeout=30)
    return res, calls.read_text().splitlines() if calls.exists() else []


def test_fresh_machine_gets_nodejs(tmp_path):
    res, calls = run(tmp_path, installed="", with_node=False)
    assert res.returncode == 0, res.stderr
    installs = [c.split() for c in calls if c.startswith("install")]
    assert len(installs) == 1 and "nodejs" in installs[0], calls


def test_node_from_elsewhere_is_enough(tmp_path):
    res, calls = run(tmp_path, installed="", with_node=True)
    assert res.returncode == 0, res.stderr
    installs = [c.split() for c in calls if c.startswith("install")]
    assert installs and "nodejs" not in installs[0] and "curl" in installs[0], calls


def test_nothing_missing_means_no_apt_get(tmp_path):
    res, calls = run(tmp_path, installed="*", with_node=False)
    assert res.returncode == 0, res.stderr
    assert calls == []
    assert "Debian packages present" in res.stdout
