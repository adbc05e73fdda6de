"""ami_setup.sh, run against a scratch directory standing in for the image's root file system."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / "ami_setup.sh"


def _setup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_installs_the_worker_and_a_boot_time_cron_entry(tmp_path):
    done = _setup("--root", str(tmp_path), "--no-packages")
    assert done.returncode == 0, done.stderr
    cron = (tmp_path / "etc/cron.d/cloudkon-worker").read_text().splitlines()
    assert ("@reboot root cd /opt/cloudkon && /usr/bin/python3 -m cloudkon worker --ec2 "
            ">> /var/log/cloudkon-worker.log 2>&1") in cron
    assert "/var/log/cloudkon-worker.log {" in (tmp_path / "etc/logrotate.d/cloudkon-worker").read_text()
    # everything the worker imports (remoteworker once its options are read) was installed: every
    # module of the package it loads comes from the image
    app = tmp_path / "opt/cloudkon"
    check = (f"import sys; sys.path.insert(0, {str(app)!r}); import cloudkon.worker, cloudkon.remoteworker; "
             f"print([m for m, module in sys.modules.items() if m.startswith('cloudkon') "
             f"and not module.__file__.startswith({str(app)!r})])")
    loaded = subprocess.run([sys.executable, "-I", "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    help_run = subprocess.run([sys.executable, "-m", "cloudkon", "worker", "--help"], cwd=app,
                              capture_output=True, text=True)
    assert help_run.returncode == 0 and "--ec2" in help_run.stdout, help_run.stderr


def test_running_it_again_changes_nothing(tmp_path):
    assert _setup("--root", str(tmp_path), "--no-packages").returncode == 0
    first = _tree(tmp_path)
    assert _setup("--root", str(tmp_path), "--no-packages").returncode == 0
    assert _tree(tmp_path) == first


def test_help_and_bad_options():
    done = _setup("--help")
    assert done.returncode == 0 and "Usage: sudo bash ami_setup.sh" in done.stdout
    bad = _setup("--frobnicate")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_bash_syntax_and_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    shellcheck = (shutil.which("shellcheck", path=str(Path(sys.executable).parent))
                  or shutil.which("shellcheck"))
    assert shellcheck, "shellcheck is not installed: pip install -e '.[test]'"
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
