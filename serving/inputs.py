"""Request payloads to validated model input, checked against the model signature.

A tabular signature (named columns of scalar types, or one 2-D numeric tensor) gets this
module's own parser, which builds numpy arrays straight from the decoded JSON: one 2-D matrix
when every column is numeric (`Rows.matrix`), else one 1-D array per column (`Rows.columns`).
Every refusal is a 400 `ServingError` that names the offending column.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

from serving.errors import bad_request

# MLflow DataType name -> numpy dtype of the column in the DataFrame MLflow would build.
NUMERIC_DTYPES: dict[str, type] = {
    "double": np.float64,
    "float": np.float32,
    "long": np.int64,
    "integer": np.int32,
}
COLUMN_DTYPES: dict[str, Any] = {**NUMERIC_DTYPES, "boolean": np.bool_, "string": object}
# The JSON values (as decoded by `json`) each column type takes.
_NUMBERS = frozenset((int, float))
_STRINGS = frozenset((str,))
_LIST = {list}
_FLOAT = {float}
_JSON_TYPES: dict[str, frozenset[type]] = {
    "double": _NUMBERS,
    "float": _NUMBERS,
    "long": _NUMBERS,
    "integer": _NUMBERS,
    "boolean": frozenset((bool,)),
    "string": _STRINGS,
}

_RAW_FLOATS = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}  # as serving.v2codec reads them
_V2_KINDS = {
    "BOOL": "b",
    "UINT8": "u",
    "UINT16": "u",
    "UINT32": "u",
    "UINT64": "u",
    "INT8": "i",
    "INT16": "i",
    "INT32": "i",
    "INT64": "i",
    "FP16": "f",
    "FP32": "f",
    "FP64": "f",
    "BYTES": "U",
}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str  # an MLflow DataType name: double, float, long, integer, boolean, string
    required: bool = True


class Rows:
    """Validated input of one request (or of a whole batch): `matrix` or `columns`, n rows."""

    __slots__ = ("matrix", "columns", "n")

    def __init__(
        self, n: int, matrix: np.ndarray | None = None, columns: dict[str, np.ndarray] | None = None
    ) -> None:
        self.n = n
        self.matrix = matrix
        self.columns = columns

    def as_columns(self, names: Sequence[str]) -> dict[str, list]:
        """Column name -> list of values (the prediction log's `inputs`)."""
        if self.matrix is not None:
            return dict(zip(names, self.matrix.T.tolist(), strict=False))
        return {name: values.tolist() for name, values in self.columns.items()}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _has_bool(values: list) -> bool:
    """Whether a JSON boolean is among values or in its nested lists (rows, a [n, 1] column).

    numpy reads [true, 1.5] as [1.0, 1.5]: a boolean in a numeric column must be found in the
    decoded list, before it becomes an array. (This runs on every numeric request: the checks
    are `in` over `map`, at C speed.)
    """
    types = set(map(type, values))
    if bool in types:
        return True
    if list in types:
        # one pass over every nested value (a 100 x 20 body: 1.5x faster than row by row)
        nested = chain.from_iterable(value for value in values if type(value) is list)
        return bool in set(map(type, nested))
    return False


def _float_matrix(rows: list, k: int) -> tuple[np.ndarray | None, set[type] | None]:
    """``np.array(rows)`` for the common body: every row a list of k JSON floats. Then that
    matrix is float64 and holds no boolean (numpy would read `true` as 1.0), and one pass to
    flatten plus one to convert costs half of numpy's own discovery of the nested lists' shape
    and type. (None, the values' types) for rows of k values that are not all floats (integers
    too: numpy keeps those beyond 64 bits as objects), which then go the general way without
    looking for booleans again; (None, None) for anything else."""
    if set(map(type, rows)) != _LIST or set(map(len, rows)) != {k}:
        return None, None
    flat = list(chain.from_iterable(rows))
    types = set(map(type, flat))
    if types != _FLOAT:
        return None, types
    return np.fromiter(flat, np.float64, len(flat)).reshape(len(rows), k), types


def _first_of_wrong_type(values: list, accepted: frozenset[type]) -> tuple[int, Any]:
    """(row, value) of the first value whose type is not accepted, looking into one level of
    nested lists (rows, or a [n, 1] column); (-1, None) if there is none.

    numpy makes ["a", 1] a string array (and [true, 1.5] a float one): a JSON value of the
    wrong type must be found in the decoded list, before it becomes an array.
    """
    if set(map(type, values)) <= accepted:  # the common case, at C speed
        return -1, None
    for i, value in enumerate(values):
        if type(value) is list:
            if set(map(type, value)) - {list} <= accepted:  # deeper nesting: a shape error
                continue
            for item in value:
                if type(item) is not list and type(item) not in accepted:
                    return i, item
        elif type(value) not in accepted:
            return i, value
    return -1, None


def _first_bad(values: np.ndarray, ok: Any) -> tuple[int, Any]:
    for i, value in enumerate(values.tolist()):
        if not ok(value):
            return i, value
    return -1, None


class TabularSchema:
    """The columns a model takes, from its MLflow signature, and the parsers for each format."""

    def __init__(self, columns: list[Column], *, positional: bool = False) -> None:
        self.columns = columns
        self.names = [c.name for c in columns]
        self.k = len(columns)
        # positional: the signature is one unnamed 2-D tensor; names are "0".."k-1"
        self.positional = positional
        self._index = {name: j for j, name in enumerate(self.names)}
        self.matrix_dtype: np.dtype | None = None
        if all(c.type in NUMERIC_DTYPES for c in columns):
            self.matrix_dtype = np.result_type(*[NUMERIC_DTYPES[c.type] for c in columns])
        self._int_columns = [j for j, c in enumerate(columns) if c.type in ("long", "integer")]
        # float columns in a float64 matrix: rounded to float32, as in the DataFrame MLflow builds
        self._float32_columns = []
        if self.matrix_dtype == np.float64:
            self._float32_columns = [j for j, c in enumerate(columns) if c.type == "float"]

    # --- building blocks -------------------------------------------------------------------

    def coerce(self, column: Column, values: Any) -> np.ndarray:
        """One column's values as a 1-D array of the column's dtype, or a 400 naming it."""
        try:
            arr = values if isinstance(values, np.ndarray) else np.asarray(values)
        except ValueError:
            raise bad_request(
                "wrong_type", f"column {column.name!r} must hold scalar values, not nested arrays"
            ) from None
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise bad_request("wrong_type", f"column {column.name!r} must hold scalar values")
        kind = arr.dtype.kind
        t = column.type
        if isinstance(values, list) and (
            (kind in "fiu" and t in NUMERIC_DTYPES and _has_bool(values))
            or (kind == "U" and t == "string")
        ):
            i, bad = _first_of_wrong_type(values, _NUMBERS if kind in "fiu" else _STRINGS)
            if i >= 0:
                raise bad_request(
                    "wrong_type",
                    f"column {column.name!r} expects {t}, got {_describe(bad)} (row {i})",
                )
        if t in ("double", "float"):
            if kind in "fiu":
                return arr.astype(NUMERIC_DTYPES[t], copy=False)
            if kind == "O":
                return self._coerce_objects(column, arr, lambda v: _is_number(v))
        elif t in ("long", "integer"):
            if kind in "iu":
                return self._to_int(column, arr)
            if kind == "f":
                return self._to_int(column, self._integral(column, arr))
            if kind == "O":
                return self._to_int(column, self._coerce_objects(column, arr, _is_integral))
        elif t == "boolean":
            if kind == "b":
                return arr
            if kind == "O":
                return self._coerce_objects(column, arr, lambda v: isinstance(v, bool))
        elif t == "string":
            if kind == "U":
                return arr.astype(object)
            if kind == "O":
                return self._coerce_objects(column, arr, lambda v: isinstance(v, str))
        i, bad = -1, None
        if isinstance(values, list):  # name the first value of a wrong JSON type
            i, bad = _first_of_wrong_type(values, _JSON_TYPES[t])
        if i < 0:
            i, bad = _first_bad(arr, lambda v: False) if arr.size else (0, None)
        raise bad_request(
            "wrong_type", f"column {column.name!r} expects {t}, got {_describe(bad)} (row {i})"
        )

    def _coerce_objects(self, column: Column, arr: np.ndarray, ok: Any) -> np.ndarray:
        values = arr.tolist()
        for i, value in enumerate(values):
            if value is None:
                if column.required:
                    raise bad_request(
                        "missing_value", f"column {column.name!r} is required but row {i} is null"
                    )
                if column.type not in ("double", "float", "string"):
                    raise bad_request(
                        "missing_value",
                        f"column {column.name!r} ({column.type}) cannot hold null (row {i})",
                    )
            elif not ok(value):
                raise bad_request(
                    "wrong_type",
                    f"column {column.name!r} expects {column.type}, "
                    f"got {_describe(value)} (row {i})",
                )
        if column.type in ("double", "float"):
            values = [math.nan if v is None else v for v in values]
            return np.asarray(values, dtype=NUMERIC_DTYPES[column.type])
        if column.type == "string":
            return np.asarray(values, dtype=object)
        if column.type == "boolean":
            return np.asarray(values, dtype=np.bool_)
        return np.asarray(values, dtype=np.int64)

    def _integral(self, column: Column, arr: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(arr) & (arr == np.trunc(arr)))
        if bad.any():
            i = int(np.argmax(bad))
            raise bad_request(
                "wrong_type",
                f"column {column.name!r} expects {column.type}, got number {arr[i].item()!r} (row {i})",
            )
        return arr

    def _to_int(self, column: Column, arr: np.ndarray) -> np.ndarray:
        dtype = np.dtype(NUMERIC_DTYPES[column.type])
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise bad_request(
                "wrong_type", f"column {column.name!r} has a value outside the {column.type} range"
            )
        return arr.astype(dtype, copy=False)

    def _from_coerced(self, cols: dict[str, np.ndarray], n: int) -> Rows:
        if self.matrix_dtype is None:
            return Rows(n, columns=cols)
        matrix = np.empty((n, self.k), dtype=self.matrix_dtype)
        for j, name in enumerate(self.names):
            matrix[:, j] = cols[name] if name in cols else math.nan
        return Rows(n, matrix=matrix)

    # --- formats ---------------------------------------------------------------------------

    def from_columns(self, data: dict[str, Any]) -> Rows:
        """{column: [values]} (or {column: value} for one row)."""
        missing = [c.name for c in self.columns if c.required and c.name not in data]
        if missing:
            raise bad_request("missing_column", f"missing column(s): {', '.join(missing)}")
        cols: dict[str, np.ndarray] = {}
        n = -1
        for column in self.columns:
            if column.name not in data:
                if self.matrix_dtype is not None and self.matrix_dtype.kind != "f":
                    raise bad_request("missing_column", f"missing column: {column.name}")
                continue
            values = data[column.name]
            if not isinstance(values, (list, np.ndarray)):
                values = [values]
            arr = self.coerce(column, values)
            if n == -1:
                n = len(arr)
            elif len(arr) != n:
                raise bad_request(
                    "bad_shape",
                    f"columns have different lengths: {column.name!r} has {len(arr)}, expected {n}",
                )
            cols[column.name] = arr
        if n <= 0:
            raise bad_request("empty_input", "the request holds no rows")
        return self._from_coerced(cols, n)

    def from_rows(self, rows: Any) -> Rows:
        """[[v, ...], ...]: each row holds every column, in signature order."""
        if not isinstance(rows, list):
            raise bad_request("bad_shape", "expected a list of rows")
        if not rows:
            raise bad_request("empty_input", "the request holds no rows")
        types = None  # of every value, when every row is a list of k values
        if self.matrix_dtype is not None:
            arr, types = _float_matrix(rows, self.k)
            if arr is not None:
                return self.from_matrix(arr)
        try:
            arr = np.array(rows)
        except (ValueError, TypeError):
            arr = None
        scalars = arr is not None and arr.ndim == 1 and self.k == 1 and arr.dtype.kind != "O"
        if scalars:  # one column, one value per row
            arr = arr.reshape(-1, 1)
        if arr is None or arr.ndim != 2 or arr.shape[1] != self.k:
            for i, row in enumerate(rows):
                if not isinstance(row, list) or len(row) != self.k:
                    got = f"{len(row)} values" if isinstance(row, list) else _describe(row)
                    raise bad_request(
                        "bad_shape",
                        f"row {i} must be a list of {self.k} values "
                        f"({', '.join(self.names[:5])}{', ...' if self.k > 5 else ''}), got {got}",
                    )
            raise bad_request("wrong_type", "rows must hold scalar values")
        has_bool = bool in types if types is not None else _has_bool(rows)
        if arr.dtype.kind in "fiu" and self.matrix_dtype is not None and not has_bool:
            return self.from_matrix(arr)
        # Mixed or non-numeric values: check column by column on the original values, so the
        # error names the right column.
        if scalars:
            return self._from_coerced(
                {self.names[0]: self.coerce(self.columns[0], rows)}, len(rows)
            )
        transposed = list(zip(*rows, strict=False))
        cols = {c.name: self.coerce(c, list(transposed[j])) for j, c in enumerate(self.columns)}
        return self._from_coerced(cols, len(rows))

    def from_matrix(self, arr: np.ndarray) -> Rows:
        """A 2-D array whose columns are the signature's columns, in order."""
        n = arr.shape[0]
        if n == 0:
            raise bad_request("empty_input", "the request holds no rows")
        if self.matrix_dtype is not None and arr.dtype.kind in "fiu":
            if arr.dtype.kind == "f" and self._int_columns:
                for j in self._int_columns:
                    self._integral(self.columns[j], arr[:, j])
            if self._int_columns and arr.dtype.kind in "iu":
                for j in self._int_columns:
                    self._to_int(self.columns[j], arr[:, j])
            matrix = arr.astype(self.matrix_dtype, copy=False)
            if self._float32_columns:
                matrix = matrix.copy() if matrix is arr else matrix
                for j in self._float32_columns:
                    matrix[:, j] = matrix[:, j].astype(np.float32)
            return Rows(n, matrix=matrix)
        cols = {c.name: self.coerce(c, arr[:, j]) for j, c in enumerate(self.columns)}
        return self._from_coerced(cols, n)

    def from_records(self, records: Any) -> Rows:
        """[{column: value, ...}, ...]"""
        if not isinstance(records, list):
            raise bad_request("bad_shape", "expected a list of records")
        if not records:
            raise bad_request("empty_input", "the request holds no rows")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise bad_request(
                    "bad_shape", f"record {i} must be a JSON object, got {_describe(record)}"
                )
        if self.matrix_dtype is not None:
            try:
                return self.from_rows([[r[name] for name in self.names] for r in records])
            except KeyError:
                pass  # a missing column: the column path below names it (or allows it)
        cols: dict[str, list] = {}
        for column in self.columns:
            present = [column.name in r for r in records]
            if all(present):
                cols[column.name] = [r[column.name] for r in records]
            elif column.required:
                i = present.index(False)
                raise bad_request("missing_column", f"missing column {column.name!r} (record {i})")
            elif any(present):
                cols[column.name] = [r.get(column.name) for r in records]
        return self.from_columns(cols)

    def from_split(self, split: Any) -> Rows:
        """pandas 'split' orient: {"columns": [...], "data": [[...], ...], "index": [...]}"""
        if not isinstance(split, dict):
            raise bad_request("bad_shape", "dataframe_split must be a JSON object")
        unknown = set(split) - {"columns", "data", "index"}
        if unknown:
            raise bad_request(
                "unknown_key", f"unknown key(s) in dataframe_split: {', '.join(sorted(unknown))}"
            )
        if "data" not in split:
            raise bad_request("bad_shape", "dataframe_split needs a 'data' list")
        data = split["data"]
        columns = split.get("columns")
        if columns is None or self.positional or columns == self.names:
            return self.from_rows(data)
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise bad_request("bad_shape", "dataframe_split 'columns' must be a list of strings")
        if not isinstance(data, list):
            raise bad_request("bad_shape", "dataframe_split 'data' must be a list of rows")
        width = len(columns)
        for i, row in enumerate(data):
            if not isinstance(row, list) or len(row) != width:
                raise bad_request(
                    "bad_shape", f"row {i} of dataframe_split must have {width} values"
                )
        return self.from_columns({name: [row[j] for row in data] for j, name in enumerate(columns)})

    def from_instances(self, instances: Any) -> Rows:
        """TF Serving row format: a list of records or of rows (or of scalars, one column)."""
        if isinstance(instances, dict):
            return self.from_columns(instances)
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            return self.from_records(instances)
        return self.from_rows(instances)

    def from_inputs(self, inputs: Any) -> Rows:
        """TF Serving columnar format: {column: [values]}; a list is taken as rows."""
        if isinstance(inputs, dict):
            return self.from_columns(inputs)
        return self.from_instances(inputs)

    def from_csv(self, text: str) -> Rows:
        """CSV with a header row (pandas `to_csv(index=False)`)."""
        reader = csv.reader(io.StringIO(text))
        try:
            header = next(reader)
        except StopIteration:
            raise bad_request("empty_input", "the CSV body is empty") from None
        except csv.Error as exc:
            raise bad_request("invalid_csv", f"the CSV body does not parse: {exc}") from None
        header = [h.strip() for h in header]
        try:
            lines = [line for line in reader if line]
        except csv.Error as exc:
            raise bad_request("invalid_csv", f"the CSV body does not parse: {exc}") from None
        for i, line in enumerate(lines):
            if len(line) != len(header):
                raise bad_request(
                    "bad_shape",
                    f"CSV line {i + 2} has {len(line)} fields, header has {len(header)}",
                )
        if self.positional:
            header = self.names[: len(header)] if len(header) == self.k else header
        by_name = {c.name: c for c in self.columns}
        cols: dict[str, list] = {}
        for j, name in enumerate(header):
            column = by_name.get(name)
            if column is None:
                continue  # MLflow ignores columns the signature does not name
            cols[name] = [_from_csv_field(column, line[j], i) for i, line in enumerate(lines)]
        return self.from_columns(cols)

    def from_v2_tensor(self, tensor: dict[str, Any]) -> np.ndarray:
        """One OIP v2 input tensor's data as an array of its declared shape."""
        name = tensor.get("name")
        shape = tensor.get("shape")
        datatype = tensor.get("datatype")
        data = tensor.get("data")
        if not isinstance(name, str) or not isinstance(shape, list) or data is None:
            raise bad_request(
                "bad_tensor", "each input needs 'name', 'shape', 'datatype' and 'data'"
            )
        if datatype not in _V2_KINDS:
            raise bad_request("wrong_type", f"input {name!r}: unknown datatype {datatype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not shape:
            raise bad_request("bad_shape", f"input {name!r}: shape must be a list of sizes")
        try:
            arr = np.asarray(data)
        except ValueError:
            raise bad_request("bad_shape", f"input {name!r}: data is ragged") from None
        if arr.size != math.prod(shape):
            raise bad_request(
                "bad_shape",
                f"input {name!r}: shape {shape} needs {math.prod(shape)} values, got {arr.size}",
            )
        kind = arr.dtype.kind
        want = _V2_KINDS[datatype]
        compatible = kind == want or (want == "f" and kind in "iu") or (want == "u" and kind == "i")
        if compatible and isinstance(data, list) and kind in "fiu":
            compatible = not _has_bool(data)
        elif compatible and isinstance(data, list) and kind == "U":
            compatible = _first_of_wrong_type(data, _STRINGS)[0] < 0
        if arr.size and not compatible:
            raise bad_request(
                "wrong_type", f"input {name!r}: data does not match datatype {datatype}"
            )
        return arr.reshape(shape)

    def v2_raw_matrix(self, name: str, datatype: str, shape: Any, raw: bytes) -> np.ndarray | None:
        """gRPC's common request, one FP32/FP64 [n, k] tensor in raw bytes (n > 0), as the
        array `from_v2` would make of it (`from_matrix` gives its rows), without building the
        tensor's dict first; None when the request is not that case or is wrong (the general
        path then decides, with its errors)."""
        dtype = _RAW_FLOATS.get(datatype)
        if dtype is None or len(shape) != 2:
            return None
        n, k = shape[0], shape[1]
        if k != self.k or n <= 0 or len(raw) != n * k * dtype.itemsize:
            return None
        if k == 1 and name in self._index:
            return None  # one column's tensor, not the matrix
        return np.frombuffer(raw, dtype=dtype).reshape(n, k)

    def from_v2(self, inputs: Any) -> Rows:
        """OIP v2 `inputs`: one tensor per column, or one [n, k] tensor."""
        if not isinstance(inputs, list) or not inputs:
            raise bad_request("bad_shape", "'inputs' must be a non-empty list of tensors")
        for tensor in inputs:
            if not isinstance(tensor, dict):
                raise bad_request("bad_tensor", "each input must be a JSON object")
        single = inputs[0]
        if len(inputs) == 1 and (
            single.get("name") not in self._index
            or (isinstance(single.get("shape"), list) and len(single["shape"]) == 2 and self.k > 1)
        ):
            arr = self.from_v2_tensor(single)
            if arr.ndim != 2 or arr.shape[1] != self.k:
                raise bad_request(
                    "bad_shape",
                    f"input {single.get('name')!r}: a single tensor must have shape "
                    f"[n, {self.k}], got {list(arr.shape)}",
                )
            if arr.dtype.kind == "U" and self.matrix_dtype is None:
                arr = arr.astype(object)
            return self.from_matrix(arr)
        cols = {}
        for tensor in inputs:
            arr = self.from_v2_tensor(tensor)
            name = tensor["name"]
            if name not in self._index:
                raise bad_request("unknown_column", f"input {name!r} is not a column of the model")
            if arr.ndim == 2 and arr.shape[1] == 1:
                arr = arr[:, 0]
            if arr.ndim != 1:
                raise bad_request(
                    "bad_shape", f"input {name!r}: a column tensor must have shape [n] or [n, 1]"
                )
            cols[name] = arr
        return self.from_columns(cols)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and value.is_integer()


def _from_csv_field(column: Column, raw: str, i: int) -> Any:
    text = raw.strip()
    if text == "":
        return None
    t = column.type
    try:
        if t in ("double", "float"):
            return float(text)
        if t in ("long", "integer"):
            value = float(text) if any(ch in text for ch in ".eE") else int(text)
            return value
        if t == "boolean":
            lowered = text.lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError(text)
    except ValueError:
        raise bad_request(
            "wrong_type",
            f"column {column.name!r} expects {t}, got {text[:40]!r} (CSV line {i + 2})",
        ) from None
    return raw


def tabular_schema(specs: list[dict[str, Any]] | None) -> TabularSchema | None:
    """The `TabularSchema` of a signature's inputs (MLflow's JSON form, see `serving.mlmodel`),
    or None when they are not plain tabular."""
    if not specs:
        return None
    if any(spec.get("type") == "tensor" for spec in specs):
        if len(specs) != 1:
            return None
        tensor = specs[0].get("tensor-spec") or {}
        try:
            dtype = np.dtype(tensor.get("dtype"))
        except TypeError:
            return None
        shape = tuple(tensor.get("shape") or ())
        if len(shape) != 2 or shape[0] != -1 or not isinstance(shape[1], int) or shape[1] < 1:
            return None
        mlflow_type = {
            np.dtype(np.float64): "double",
            np.dtype(np.float32): "float",
            np.dtype(np.int64): "long",
            np.dtype(np.int32): "integer",
        }.get(dtype)
        if mlflow_type is None:
            return None
        return TabularSchema(
            [Column(str(j), mlflow_type) for j in range(shape[1])], positional=True
        )
    columns = []
    for spec in specs:
        name, kind = spec.get("name"), spec.get("type")
        if not isinstance(name, str) or not isinstance(kind, str) or kind not in COLUMN_DTYPES:
            return None
        columns.append(Column(name, kind, bool(spec.get("required", True))))
    return TabularSchema(columns)
