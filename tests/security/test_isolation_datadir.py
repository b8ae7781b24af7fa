"""The data directory is the control plane's user's only: 0700, its secret key and embedded
database 0600, whatever the umask (the issue found controlplane.sqlite3 at 0644)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.lib.datadir import data_dir_secure

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(180)
def test_a_fresh_data_dir_is_private_after_migrate_under_a_permissive_umask(tmp_path):
    data = tmp_path / "data"
    env = {
        **os.environ,
        "CONTROLPLANE_DATA_DIR": str(data),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "PYTHONPATH": str(REPO),
    }
    env.pop("DATABASE_URL", None)  # the embedded SQLite database
    env.pop("SECRET_KEY", None)
    subprocess.run(
        [sys.executable, "-c", "import os; os.umask(0o022); import sys; "
         "from django.core.management import execute_from_command_line; "
         "execute_from_command_line(['manage.py', 'migrate', '--verbosity', '0'])"],
        env=env, cwd=REPO, check=True, timeout=150,
    )  # fmt: skip
    assert mode(data) == 0o700
    assert mode(data / "secret_key") == 0o600
    assert mode(data / "controlplane.sqlite3") == 0o600
    assert (data / "controlplane.sqlite3").stat().st_size > 0  # migrated: a real database


def test_an_existing_data_dir_is_tightened(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    for name in ("secret_key", "controlplane.sqlite3", "controlplane.sqlite3-wal"):
        (data / name).write_text("x")
        os.chmod(data / name, 0o644)
    data_dir_secure(data, sqlite_path=data / "controlplane.sqlite3")
    assert mode(data) == 0o700
    for name in ("secret_key", "controlplane.sqlite3", "controlplane.sqlite3-wal"):
        assert mode(data / name) == 0o600, name
