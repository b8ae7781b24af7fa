"""PostgreSQL's binary COPY format, built with NumPy: each row is a fixed-width record, so a
batch of a hundred thousand rows becomes bytes without a Python loop per value (the text
format costs a ``str()`` per value, which dominated ingestion).

Column types come from the target table's Django fields, because binary COPY needs the
exact width of each column (``integer`` is 4 bytes, ``bigint`` 8)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)

# Django's db_type -> the big-endian NumPy type of its binary representation.
_NUMERIC = {
    "bigint": ">i8",
    "integer": ">i4",
    "smallint": ">i2",
    "double precision": ">f8",
    "boolean": "?",
}


class UnsupportedColumn(TypeError):
    pass


def column_types(model, columns: Sequence[str], connection) -> list[str]:
    """The binary type of each column: a NumPy type string, or ``"text"`` for strings."""
    by_column = {f.column: f for f in model._meta.concrete_fields}
    types = []
    for column in columns:
        db_type = by_column[column].db_type(connection)
        if db_type in _NUMERIC:
            types.append(_NUMERIC[db_type])
        elif db_type.startswith(("varchar", "text")):
            types.append("text")
        else:
            raise UnsupportedColumn(f"{model.__name__}.{column}: {db_type}")
    return types


def encode(types: Sequence[str], values: Sequence[np.ndarray | Sequence[str]]) -> bytes:
    """The COPY payload for rows given column by column. Float NaN is written as NULL.

    Rows are grouped by what makes their width differ (the text of each string column, which
    NULLs they have), and each group is one structured array."""
    n = len(values[0]) if values else 0
    arrays: list[np.ndarray | None] = []
    codes: list[np.ndarray] = []  # per row, what decides its width, column by column
    code_of: dict[int, int] = {}  # column -> its index in codes
    labels: list[list[str] | None] = []
    for i, (kind, column) in enumerate(zip(types, values, strict=True)):
        if len(column) != n:
            raise ValueError("columns of different lengths")
        if kind == "text":
            distinct: dict[str, int] = {}
            inverse = np.fromiter(
                (distinct.setdefault(v, len(distinct)) for v in column), dtype=np.int64, count=n
            )
            code_of[i] = len(codes)
            codes.append(inverse)
            labels.append(list(distinct))
            arrays.append(None)
            continue
        array = np.asarray(column)
        if kind == ">f8":
            code_of[i] = len(codes)
            codes.append(np.isnan(array).astype(np.int64))
        arrays.append(array)
        labels.append(None)
    out = BytesIO()
    out.write(HEADER)
    if n:
        if codes:
            groups, group_of = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
            group_of = group_of.reshape(-1)
        else:
            groups, group_of = np.zeros((1, 0), dtype=np.int64), np.zeros(n, dtype=np.int64)
        for g, pattern in enumerate(groups.tolist()):
            rows = np.flatnonzero(group_of == g) if len(groups) > 1 else slice(None)
            size = n if len(groups) == 1 else len(rows)
            fields: list[tuple[str, str]] = [("count", ">i2")]
            fill: dict[str, object] = {"count": len(types)}
            for i, kind in enumerate(types):
                length = f"l{i}"
                fields.append((length, ">i4"))
                if kind == "text":
                    text = labels[i][pattern[code_of[i]]].encode()
                    fill[length] = len(text)
                    if text:
                        fields.append((f"v{i}", f"S{len(text)}"))
                        fill[f"v{i}"] = text
                elif kind == ">f8" and pattern[code_of[i]]:
                    fill[length] = -1  # NULL: no bytes follow
                else:
                    fields.append((f"v{i}", kind))
                    fill[length] = np.dtype(kind).itemsize
                    fill[f"v{i}"] = arrays[i][rows]
            record = np.empty(size, dtype=np.dtype(fields))
            for name, value in fill.items():
                record[name] = value
            out.write(record.tobytes())
    out.write(TRAILER)
    return out.getvalue()


def copy(cursor, table: str, columns: str, types: Sequence[str], values) -> None:
    """COPY the rows into ``table`` (its columns: ``columns``, quoted names joined by commas)
    through a psycopg2 cursor."""
    cursor.copy_expert(
        f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT binary)",
        BytesIO(encode(types, values)),
    )
