"""Checking uploaded model archives before anything is written.

Nothing from the archive is executed or unpickled: the only file parsed is
MLmodel, as YAML with the safe loader.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from controlplane.lib.errors import ApplicationError

_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveRejected(ApplicationError):
    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message, code="invalid_archive", status_code=status_code)


@dataclass(frozen=True)
class CheckedArchive:
    mlmodel: dict
    entries: int
    uncompressed_bytes: int


def _check_name(name: str) -> None:
    if "\x00" in name:
        raise ArchiveRejected(f"archive entry {name!r} contains a NUL byte")
    if "\\" in name:
        raise ArchiveRejected(f"archive entry {name!r} contains a backslash")
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveRejected(f"archive entry {name!r} is an absolute path")
    if any(part == ".." for part in name.split("/")):
        raise ArchiveRejected(f"archive entry {name!r} escapes the archive ('..')")
    normalized = posixpath.normpath(name)
    if normalized.startswith("../") or normalized == "..":
        raise ArchiveRejected(f"archive entry {name!r} escapes the archive ('..')")


def check_archive(
    fileobj: BinaryIO, *, size: int, max_bytes: int, max_entries: int, max_uncompressed: int
) -> CheckedArchive:
    """Validate a zipped MLflow model directory without writing anything."""
    if size > max_bytes:
        raise ArchiveRejected(
            f"archive is {size} bytes; the limit is {max_bytes} bytes", status_code=413
        )
    try:
        zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveRejected(f"artifact is not a valid zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise ArchiveRejected(f"archive has {len(infos)} entries; the limit is {max_entries}")
        total = 0
        names = set()
        for info in infos:
            _check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveRejected(f"archive entry {info.filename!r} is a symbolic link")
            file_type = stat.S_IFMT(mode)
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveRejected(f"archive entry {info.filename!r} is not a regular file")
            total += info.file_size
            if total > max_uncompressed:
                raise ArchiveRejected(
                    f"archive expands to more than {max_uncompressed} bytes", status_code=413
                )
            names.add(info.filename)
        if "MLmodel" not in names:
            nested = sorted(n for n in names if n.endswith("/MLmodel"))
            hint = (
                f" (found {nested[0]!r}: zip the model directory's contents, not the directory)"
                if nested
                else ""
            )
            raise ArchiveRejected(f"MLmodel not found at the archive root{hint}")
        try:
            raw = zf.read("MLmodel")
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError) as exc:
            raise ArchiveRejected(f"MLmodel cannot be read ({exc})") from exc
        if len(raw) > 1024 * 1024:
            raise ArchiveRejected("MLmodel is larger than 1 MiB")
        try:
            mlmodel = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ArchiveRejected(f"MLmodel is not valid YAML: {exc}") from exc
        if (
            not isinstance(mlmodel, dict)
            or not isinstance(mlmodel.get("flavors"), dict)
            or not mlmodel["flavors"]
        ):
            raise ArchiveRejected("MLmodel has no 'flavors' mapping: not an MLflow model")
        return CheckedArchive(mlmodel=mlmodel, entries=len(infos), uncompressed_bytes=total)


def extract_archive(fileobj: BinaryIO, dest: Path) -> None:
    """Extract an archive that ``check_archive`` accepted, entry by entry, and
    verify every path stays inside ``dest`` (defence in depth)."""
    dest = dest.resolve()
    with zipfile.ZipFile(fileobj) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if target != dest and dest not in target.parents:
                raise ArchiveRejected(f"archive entry {info.filename!r} escapes the archive")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1024 * 1024)
