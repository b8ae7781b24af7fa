"""Checking uploaded model archives before anything is written.

Nothing from the archive is executed or unpickled: the only file parsed is
MLmodel, as YAML with a loader that refuses aliases and anchors.

Everything that can be decided from the zip's central directory (entry names,
types, declared sizes, compression ratios, totals) is decided before a single
entry is decompressed; entries are then read in bounded chunks, so an entry
that lies about its size costs at most one chunk over its limit.
"""

from __future__ import annotations

import posixpath
import re
import stat
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from controlplane.lib.errors import ApplicationError

_DRIVE = re.compile(r"^[A-Za-z]:")
CHUNK = 64 * 1024
MLMODEL_MAX_BYTES = 1024 * 1024
# Entries smaller than this are never refused for their ratio: a tiny file of
# repeated bytes compresses very well and costs nothing to expand.
_RATIO_FLOOR = 1024 * 1024


class ArchiveRejected(ApplicationError):
    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message, code="invalid_archive", status_code=status_code)


@dataclass(frozen=True)
class CheckedArchive:
    mlmodel: dict
    entries: int
    uncompressed_bytes: int


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader, minus anchors and aliases: a document of a few KB cannot
    expand into megabytes ("billion laughs")."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.YAMLError(
                f"YAML anchors and aliases are not accepted (line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)


def load_yaml(raw: bytes | str, *, max_bytes: int, what: str = "YAML") -> object:
    """Parse YAML from a user: at most ``max_bytes``, no anchors or aliases, no
    tags beyond the safe ones. Raises ``ValueError`` with a message to show."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ValueError(f"{what} is larger than {max_bytes} bytes")
    try:
        return yaml.load(raw, Loader=_NoAliasLoader)  # noqa: S506 - a safe loader, aliases refused
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None


def normalized_name(name: str) -> str:
    """The path an entry ends up at: what two entries must not share."""
    return unicodedata.normalize("NFC", posixpath.normpath(name.rstrip("/") or "."))


def _check_name(name: str) -> None:
    if "\x00" in name:
        raise ArchiveRejected(f"archive entry {name!r} contains a NUL byte")
    if "\\" in name:
        raise ArchiveRejected(f"archive entry {name!r} contains a backslash")
    if "%" in name:
        # Nothing legitimate needs it, and a later layer (an HTTP artifact store)
        # may decode `..%2f` into a path separator.
        raise ArchiveRejected(f"archive entry {name!r} contains a '%' escape")
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveRejected(f"archive entry {name!r} is an absolute path")
    if any(part == ".." for part in name.split("/")):
        raise ArchiveRejected(f"archive entry {name!r} escapes the archive ('..')")
    normalized = posixpath.normpath(name)
    if normalized.startswith("../") or normalized == "..":
        raise ArchiveRejected(f"archive entry {name!r} escapes the archive ('..')")


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The entry's bytes, read a chunk at a time; refused as soon as it passes ``limit``."""
    parts, total = [], 0
    with zf.open(info) as src:
        while chunk := src.read(CHUNK):
            total += len(chunk)
            if total > limit:
                raise ArchiveRejected(
                    f"archive entry {info.filename!r} is larger than {limit} bytes",
                    status_code=413,
                )
            parts.append(chunk)
    return b"".join(parts)


def check_archive(
    fileobj: BinaryIO,
    *,
    size: int,
    max_bytes: int,
    max_entries: int,
    max_uncompressed: int,
    max_ratio: int = 200,
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
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveRejected(f"archive entry {info.filename!r} is a symbolic link")
            file_type = stat.S_IFMT(mode)
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveRejected(f"archive entry {info.filename!r} is not a regular file")
            name = normalized_name(info.filename)
            if name in by_name:
                raise ArchiveRejected(
                    f"archive entries {by_name[name].filename!r} and {info.filename!r} "
                    "name the same file"
                )
            by_name[name] = info
            if info.file_size > _RATIO_FLOOR and info.file_size > max_ratio * max(
                info.compress_size, 1
            ):
                raise ArchiveRejected(
                    f"archive entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}"
                    f" times (to {info.file_size} bytes); the limit is {max_ratio} times",
                    status_code=413,
                )
            total += info.file_size
            if total > max_uncompressed:
                raise ArchiveRejected(
                    f"archive expands to more than {max_uncompressed} bytes", status_code=413
                )
        mlmodel_info = by_name.get("MLmodel")
        if mlmodel_info is None or mlmodel_info.is_dir():
            nested = sorted(n for n in by_name if n.endswith("/MLmodel"))
            hint = (
                f" (found {nested[0]!r}: zip the model directory's contents, not the directory)"
                if nested
                else ""
            )
            raise ArchiveRejected(f"MLmodel not found at the archive root{hint}")
        if mlmodel_info.file_size > MLMODEL_MAX_BYTES:
            raise ArchiveRejected(
                f"MLmodel is {mlmodel_info.file_size} bytes; the limit is {MLMODEL_MAX_BYTES}",
                status_code=413,
            )
        try:
            raw = _read_bounded(zf, mlmodel_info, MLMODEL_MAX_BYTES)
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError, zlib.error) as exc:
            raise ArchiveRejected(f"MLmodel cannot be read ({exc})") from exc
        try:
            mlmodel = load_yaml(raw, max_bytes=MLMODEL_MAX_BYTES, what="MLmodel")
        except ValueError as exc:
            raise ArchiveRejected(str(exc)) from None
        if (
            not isinstance(mlmodel, dict)
            or not isinstance(mlmodel.get("flavors"), dict)
            or not mlmodel["flavors"]
        ):
            raise ArchiveRejected("MLmodel has no 'flavors' mapping: not an MLflow model")
        return CheckedArchive(mlmodel=mlmodel, entries=len(infos), uncompressed_bytes=total)


def extract_archive(fileobj: BinaryIO, dest: Path) -> None:
    """Extract an archive that ``check_archive`` accepted, entry by entry and chunk
    by chunk, never more bytes than an entry declared, and verify every path stays
    inside ``dest`` (defence in depth)."""
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
            written = 0
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(1024 * 1024):
                        written += len(chunk)
                        if written > info.file_size:
                            raise ArchiveRejected(
                                f"archive entry {info.filename!r} is longer than it declares"
                            )
                        dst.write(chunk)
            except FileExistsError:
                raise ArchiveRejected(
                    f"archive entry {info.filename!r} names a file twice"
                ) from None
            except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                raise ArchiveRejected(
                    f"archive entry {info.filename!r} cannot be read ({exc})"
                ) from exc
