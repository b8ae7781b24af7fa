"""Loading an MLflow model and calling it: with `serving.flavors`, the only modules that touch
MLflow or the flavors.

When the signature is tabular, input is built as numpy arrays by `serving.inputs`; for
scikit-learn and ONNX a fast path then calls the estimator or the onnxruntime session directly,
skipping the per-request pandas DataFrame and MLflow's schema enforcement (already done by
`serving.inputs`). Such models are also loaded without MLflow when `serving.flavors` can load
them exactly as MLflow would; every other model loads through `mlflow.pyfunc.load_model`.

The fast path is only kept if, at warm-up, it returns exactly what the reference returns for
the input example: `pyfunc.predict` on the DataFrame MLflow would build, or without MLflow the
estimator's own predict on that DataFrame. A scikit-learn model loaded by skops with default
trusted types holds nothing but scikit-learn, NumPy and SciPy objects, which answer the same
for a matrix as for a DataFrame of the same values (or raise): there the check is that the
fast path runs, which spares importing pandas.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from serving import flavors, mlmodel
from serving.errors import ServingError, bad_request
from serving.inputs import NUMERIC_DTYPES, Rows, TabularSchema, tabular_schema

logger = logging.getLogger("serving.model")

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

_V2_DATATYPES = {
    "b": "BOOL",
    "i1": "INT8",
    "i2": "INT16",
    "i4": "INT32",
    "i8": "INT64",
    "u1": "UINT8",
    "u2": "UINT16",
    "u4": "UINT32",
    "u8": "UINT64",
    "f2": "FP16",
    "f4": "FP32",
    "f8": "FP64",
}


def v2_datatype(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "BOOL"
    return _V2_DATATYPES.get(f"{dtype.kind}{dtype.itemsize}", "BYTES")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _jsonable(value: Any) -> Any:
    """As mlflow.utils.proto_json_utils._get_jsonable_obj(value, pandas_orient="records")."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.DataFrame):
        return value.to_dict(orient="records")
    if pd is not None and isinstance(value, pd.Series):
        return pd.DataFrame(value).to_dict(orient="records")
    return value


def dumps(value: Any) -> bytes:
    return json.dumps(value, default=_json_default, separators=(",", ":")).encode()


class Outputs:
    """A model's predictions for n rows, sliceable per request of a batch.

    kind "array": one ndarray (or Series/list made one); "frame": a DataFrame kept as column
    arrays (MLflow answers it as records); "dict": named arrays (answered as a dict of lists);
    "other": anything else, answered as MLflow would (never batched).
    """

    __slots__ = ("kind", "value", "n")

    def __init__(self, kind: str, value: Any, n: int) -> None:
        self.kind = kind
        self.value = value
        self.n = n

    @classmethod
    def of(cls, raw: Any, n: int) -> Outputs:
        # Without pandas imported (the fast path for numeric scikit-learn models), raw cannot
        # be a DataFrame or a Series.
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(raw, pd.DataFrame):
            if len(raw) == n:
                return cls("frame", {str(c): raw[c].to_numpy() for c in raw.columns}, n)
        elif pd is not None and isinstance(raw, pd.Series):
            raw = raw.to_numpy()
        elif isinstance(raw, list) and len(raw) == n:
            return cls("array", raw, n)
        elif isinstance(raw, dict) and raw:
            arrays = {str(k): np.asarray(v) for k, v in raw.items()}
            if all(a.ndim >= 1 and len(a) == n for a in arrays.values()):
                return cls("dict", arrays, n)
        if isinstance(raw, np.ndarray) and raw.ndim >= 1 and len(raw) == n:
            return cls("array", raw, n)
        return cls("other", raw, n)

    def slice(self, start: int, stop: int) -> Outputs:
        if self.kind == "array":
            return Outputs("array", self.value[start:stop], stop - start)
        if self.kind in ("frame", "dict"):
            return Outputs(
                self.kind, {k: v[start:stop] for k, v in self.value.items()}, stop - start
            )
        raise ValueError("these outputs cannot be split by rows")

    def predictions(self) -> Any:
        """The value of `predictions` in MLflow's scoring-server answer."""
        if self.kind == "array":
            value = self.value
            return value.tolist() if isinstance(value, np.ndarray) else value
        if self.kind == "frame":
            names = list(self.value)
            lists = [self.value[name].tolist() for name in names]
            return [dict(zip(names, row, strict=False)) for row in zip(*lists, strict=False)]
        if self.kind == "dict":
            return {k: v.tolist() for k, v in self.value.items()}
        return _jsonable(self.value)

    def rows(self) -> list:
        """One output per input row (the prediction log's `outputs`)."""
        if self.kind == "dict":
            names = list(self.value)
            lists = [self.value[name].tolist() for name in names]
            return [dict(zip(names, row, strict=False)) for row in zip(*lists, strict=False)]
        value = self.predictions()
        return value if isinstance(value, list) else [value]

    def v2_outputs(self, wanted: set[str] | None = None) -> list[dict[str, Any]]:
        """OIP v2 output tensors."""
        if self.kind == "array":
            named = {"predict": np.asarray(self.value)}
        elif self.kind in ("frame", "dict"):
            named = self.value
        else:
            named = {"predict": np.asarray(self.predictions(), dtype=object)}
        tensors = []
        for name, arr in named.items():
            if wanted is not None and name not in wanted:
                continue
            datatype = v2_datatype(arr.dtype)
            data = arr.ravel().tolist()
            if datatype == "BYTES":
                data = [
                    v if isinstance(v, str) else json.dumps(v, default=_json_default) for v in data
                ]
            tensors.append(
                {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}
            )
        return tensors


# How a loaded model predicts: the fast path (or None), the reference path, and whether the
# fast path answers as the reference does by construction (no comparison at warm-up).
_Paths = tuple[Callable[[Rows], Any] | None, Callable[[Rows], Outputs], bool]


class LoadedModel:
    """A model ready to predict, with its input schema and (maybe) a fast path.

    `loader` says how it was loaded: "sklearn-skops", "sklearn-pickle", "sklearn-cloudpickle"
    or "onnx" without MLflow (`serving.flavors`), else "pyfunc" (`mlflow.pyfunc.load_model`).
    """

    def __init__(self, model_dir: Path) -> None:
        started = time.perf_counter()
        self.model_dir = model_dir
        self.file = mlmodel.read(model_dir)
        self.flavor = self.file.flavor
        # Params are per request, so a model that takes them is not batched.
        self.schema: TabularSchema | None = None
        if not self.file.has_params:
            self.schema = tabular_schema(self.file.inputs)
        self.output_specs = self.file.output_specs()
        self.mode = "tabular" if self.schema is not None else "generic"
        self.pyfunc: Any = None
        self.input_schema: Any = None  # MLflow's Schema, for the generic path
        self.fast: Callable[[Rows], Any] | None = None
        # predict on the DataFrame MLflow would build: pyfunc.predict or what it calls
        self._reference: Callable[[Rows], Outputs] = self._pyfunc_reference
        # the fast path answers as the reference does by construction: no check at warm-up
        self._fast_is_exact = False
        direct = self._load_direct() if self.schema is not None else None
        if direct is not None:
            self.loader = direct.loader
        else:
            self.loader = "pyfunc"
            self._load_pyfunc()
        self.load_seconds = time.perf_counter() - started

    # --- loading -----------------------------------------------------------------------------

    def _load_direct(self) -> flavors.Direct | None:
        """Load without MLflow if `serving.flavors` can; set the fast and reference paths."""
        try:
            direct, paths = None, None
            if self.file.loader_module == "mlflow.sklearn":
                numeric = self.schema.matrix_dtype is not None
                direct = flavors.load_sklearn(self.file, numeric=numeric)
                paths = self._sklearn_paths(direct) if direct is not None else None
            elif self.file.loader_module == "mlflow.onnx":
                direct = flavors.load_onnx(self.file)
                paths = self._onnx_paths(direct) if direct is not None else None
        except Exception:
            logger.warning(
                "cannot load the model without MLflow; using mlflow.pyfunc", exc_info=True
            )
            return None
        if paths is None:
            return None
        self.fast, self._reference, self._fast_is_exact = paths
        return direct

    def _load_pyfunc(self) -> None:
        import mlflow.pyfunc

        self.pyfunc = mlflow.pyfunc.load_model(str(self.model_dir))
        self.input_schema = self.pyfunc.metadata.get_input_schema()
        if self.schema is None:
            return
        try:
            if self.file.loader_module == "mlflow.sklearn":
                pyfunc_conf = self.file.pyfunc
                estimator = self.pyfunc.get_raw_model()
                fn = getattr(estimator, pyfunc_conf.get("predict_fn", "predict"))
                self.fast = self._sklearn_fast(estimator, fn)
            elif self.file.loader_module == "mlflow.onnx":
                self.fast = self._onnx_fast(self.pyfunc.get_raw_model())
        except Exception:
            logger.warning("no fast path for this model; using pyfunc", exc_info=True)

    def _sklearn_paths(self, direct: flavors.Direct) -> _Paths:
        estimator = direct.raw
        fn = getattr(estimator, self.file.pyfunc.get("predict_fn", "predict"))

        def reference(rows: Rows) -> Outputs:
            # what mlflow.sklearn's pyfunc calls once MLflow enforced the schema (as `_frame`)
            return Outputs.of(fn(self._frame(rows)), rows.n)

        if self.schema.matrix_dtype is None:
            return None, reference, False
        return self._sklearn_fast(estimator, fn), reference, direct.sklearn_only

    def _onnx_paths(self, direct: flavors.Direct) -> _Paths | None:
        fast = self._onnx_fast(direct.raw)
        if fast is None:
            return None  # several inputs: left to MLflow's DataFrame handling
        return fast, lambda rows: _outputs(fast(rows), rows.n), True

    # --- fast paths --------------------------------------------------------------------------

    def _sklearn_fast(self, estimator: Any, fn: Callable) -> Callable[[Rows], Any] | None:
        schema = self.schema
        if schema.matrix_dtype is None:
            return lambda rows: fn(self._frame(rows))
        names_in = getattr(estimator, "feature_names_in_", None)
        if names_in is not None and list(names_in) != schema.names:
            return None
        # Fitted on a DataFrame but fed the same columns as a matrix: the values are the same,
        # only scikit-learn's "X does not have valid feature names" warning differs.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return lambda rows: fn(rows.matrix)

    def _onnx_fast(self, session: Any) -> Callable[[Rows], Any] | None:
        inputs = session.get_inputs()
        if len(inputs) != 1 or self.schema.matrix_dtype is None:
            return None
        input_name = inputs[0].name
        to_float32 = inputs[0].type == "tensor(float)"
        output_names = [o.name for o in session.get_outputs()]

        def predict(rows: Rows) -> Any:
            matrix = rows.matrix
            if to_float32 and matrix.dtype == np.float64:
                matrix = matrix.astype(np.float32)
            results = session.run(output_names, {input_name: matrix})
            # The same shape MLflow's ONNX pyfunc gives a DataFrame input: each output
            # flattened to one column.
            return {
                "__frame__": {
                    name: np.asarray(r).reshape(-1)
                    for name, r in zip(output_names, results, strict=False)
                }
            }

        return predict

    # --- predicting --------------------------------------------------------------------------

    def _frame(self, rows: Rows) -> Any:
        import pandas as pd

        schema = self.schema
        if rows.matrix is not None:
            columns = {}
            for j, column in enumerate(schema.columns):
                columns[column.name] = rows.matrix[:, j].astype(
                    NUMERIC_DTYPES[column.type], copy=False
                )
            return pd.DataFrame(columns)
        return pd.DataFrame(
            {name: rows.columns[name] for name in schema.names if name in rows.columns}
        )

    def _pyfunc_reference(self, rows: Rows) -> Outputs:
        data = rows.matrix if self.schema.positional else self._frame(rows)
        return Outputs.of(self.pyfunc.predict(data), rows.n)

    def predict_reference(self, rows: Rows) -> Outputs:
        """What MLflow's own `pyfunc.predict` answers (through it, or through what it calls)."""
        return self._reference(rows)

    def predict(self, rows: Rows) -> Outputs:
        if self.fast is None:
            return self.predict_reference(rows)
        return _outputs(self.fast(rows), rows.n)

    def predict_generic(self, payload: Any, content_type: str) -> tuple[Outputs, Any]:
        """Any pyfunc model: MLflow's own parsing and predict; returns outputs and the input."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server

        params = None
        try:
            if content_type == "text/csv":
                import io

                data = scoring_server.parse_csv_input(io.StringIO(payload), self.input_schema)
            else:
                params = payload.get("params")
                data = scoring_server.infer_and_parse_data(
                    {k: v for k, v in payload.items() if k in FORMATS}, self.input_schema
                )
        except MlflowException as exc:
            raise bad_request("invalid_input", exc.message) from None
        try:
            raw = self.pyfunc.predict(data, params=params) if params else self.pyfunc.predict(data)
        except MlflowException as exc:
            if "schema" in exc.message.lower():
                raise bad_request("schema_mismatch", exc.message) from None
            raise
        n = len(data) if hasattr(data, "__len__") else 1
        return Outputs.of(raw, n), data

    # --- warm-up -----------------------------------------------------------------------------

    def serving_example(self) -> dict[str, Any] | None:
        """The input example as a scoring request body, if the model was saved with one."""
        try:
            return self.file.serving_example()
        except Exception:
            logger.warning("cannot read the model's input example", exc_info=True)
            return None

    def check_fast_path(self, rows: Rows) -> None:
        """Keep the fast path only if it answers exactly like the reference on these rows."""
        if self.fast is None:
            return
        if self._fast_is_exact:
            try:
                self.predict(rows)
            except Exception:
                logger.warning("fast path failed on the input example; not using it", exc_info=True)
                self.fast = None
            return
        reference = self.predict_reference(rows)
        try:
            fast = self.predict(rows)
            same = dumps(fast.predictions()) == dumps(reference.predictions())
        except Exception:
            logger.warning("fast path failed on the input example", exc_info=True)
            same = False
        if not same:
            logger.warning(
                "fast path disagrees with the reference on the input example; not using it"
            )
            self.fast = None


def _outputs(raw: Any, n: int) -> Outputs:
    """Outputs of a fast path: as `Outputs.of`, or the columns of an ONNX model's frame."""
    if isinstance(raw, dict) and "__frame__" in raw:
        frame = raw["__frame__"]
        lengths = {len(v) for v in frame.values()}
        if lengths != {n}:
            raise ValueError(f"model outputs have lengths {sorted(lengths)} for {n} rows")
        return Outputs("frame", frame, n)
    return Outputs.of(raw, n)


def parse_scoring_json(schema: TabularSchema, payload: Any) -> Rows:
    """The MLflow scoring protocol's JSON body."""
    if not isinstance(payload, dict):
        raise bad_request(
            "bad_payload",
            f"the body must be a JSON object with exactly one of {', '.join(FORMATS)}",
        )
    unknown = [k for k in payload if k not in FORMATS and k != "params"]
    if unknown:
        raise bad_request(
            "unknown_key",
            f"unknown key(s) {', '.join(map(repr, unknown))}; expected one of {', '.join(FORMATS)}",
        )
    keys = [k for k in payload if k in FORMATS]
    if len(keys) != 1:
        raise bad_request(
            "bad_payload", f"the body must have exactly one of {', '.join(FORMATS)}, got {keys}"
        )
    key = keys[0]
    value = payload[key]
    if key == "dataframe_split":
        return schema.from_split(value)
    if key == "dataframe_records":
        return schema.from_records(value)
    if key == "instances":
        return schema.from_instances(value)
    return schema.from_inputs(value)


def not_ready() -> ServingError:
    return ServingError(503, "not_ready", "the model is not loaded yet")
