"""The data directory's permissions: the control plane's user only.

It holds the secret key, the embedded database (live session keys), MLflow's store, the broker's
messages and every model's files. Nobody else needs to enter it: the Docker engine mounts the
few paths a container needs by themselves, sandboxed local servers see it as an empty tmpfs with
only their own model and socket directory bound back (deployments/runtimes/sandbox.py), and an
unsandboxed local server runs as the control plane's user anyway. So: the directory 0700, the
secret files in it 0600, whatever the umask of whoever created them.
"""

from __future__ import annotations

import os
from pathlib import Path

SECRET_FILES = ("secret_key", "controlplane.sqlite3", "install_id")


def data_dir_secure(data_dir: Path, *, sqlite_path: Path | None = None) -> None:
    """Create ``data_dir`` 0700 (or tighten it), make its secret files 0600, and create the
    embedded SQLite database 0600 before SQLite would create it with the umask's 0644 (SQLite
    gives its -wal and -shm files the database file's mode)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_uid == os.geteuid():
        os.chmod(data_dir, 0o700)
    paths = [data_dir / name for name in SECRET_FILES]
    if sqlite_path is not None:
        paths.append(sqlite_path)
        if not sqlite_path.exists() and sqlite_path.parent.is_dir():
            os.close(os.open(sqlite_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for path in paths:
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
            try:
                if candidate.stat().st_uid == os.geteuid():
                    os.chmod(candidate, 0o600)
            except FileNotFoundError:
                pass


# Commands that act on an existing installation: run against the wrong data directory they
# would create an empty one and fail on its missing tables.
NEEDS_INSTALLATION = ("create_api_token", "create_user", "createsuperuser", "changepassword")


def missing_installation(argv: list[str], environ: dict, default_dir: Path) -> str | None:
    """A one-line error when ``argv`` runs such a command and the embedded database is not
    there (checked before Django starts, so nothing is created); None otherwise."""
    if len(argv) < 2 or argv[1] not in NEEDS_INSTALLATION or environ.get("DATABASE_URL"):
        return None
    data_dir = Path(environ.get("CONTROLPLANE_DATA_DIR") or default_dir).resolve()
    database = data_dir / "controlplane.sqlite3"
    if database.exists():
        return None
    return (
        f"error: no control plane database at {database}. Set CONTROLPLANE_DATA_DIR to the "
        "data directory the server uses (or DATABASE_URL to its database)."
    )


def no_database_message(exc: Exception) -> str:
    return (
        f"the database has no control plane tables ({exc}). Set CONTROLPLANE_DATA_DIR to the "
        "data directory the server uses (or DATABASE_URL to its database), or run migrate."
    )
