"""The code stays ruff clean (rules in pyproject.toml)."""

import shutil
import subprocess
import sys

from conftest import ROOT


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    assert ruff is not None, "ruff is not installed: pip install -e '.[test]'"
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_local_mode_never_loads_boto3():
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from cloudkon import client, scheduler, localworkers; assert 'boto3' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
