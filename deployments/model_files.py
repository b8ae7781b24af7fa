"""Model files for serving: downloaded once per version from MLflow, kept
(so a rollback rebuilds nothing), and identified by the sha256 of their
contents. Files only: nothing is loaded here."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

# Imported at module load so Celery's prefork children inherit MLflow already
# imported (seconds saved on the first deployment of each child).
import mlflow  # noqa: F401,E402
from django.conf import settings

from registry.mlflow_store import get_store


def files_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1024 * 1024), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def ensure_model_files(model_name: str, version: int) -> tuple[Path, str]:
    """(directory, sha256) of the version's files, downloading them if needed."""
    root = Path(settings.CONTROLPLANE_MODEL_CACHE_DIR) / model_name / str(version)
    marker = root / ".sha256"
    if marker.exists():
        return root / "model", marker.read_text().strip()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root.parent))
    try:
        (staging / "dl").mkdir()
        downloaded = get_store().download_version(model_name, version, staging / "dl")
        if not (downloaded / "MLmodel").exists():
            raise FileNotFoundError(f"{model_name} v{version} has no MLmodel file")
        target = staging / "model"
        os.rename(downloaded, target)
        sha = files_sha256(target)
        for path in target.rglob("*"):  # servers only read them
            os.chmod(path, 0o755 if path.is_dir() else 0o444)
        (staging / ".sha256").write_text(sha)
        try:
            os.rename(staging, root)  # atomic: a half-downloaded model is never used
        except OSError:
            if not marker.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another worker won the race
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / "model", marker.read_text().strip()
