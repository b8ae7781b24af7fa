"""Loading an MLflow model and calling it: the only module that touches MLflow or the flavors.

Every model loads through `mlflow.pyfunc.load_model`. When the signature is tabular, input is
built as numpy arrays by `serving.inputs`; for scikit-learn and ONNX a fast path then calls the
estimator or the onnxruntime session directly, skipping the per-request pandas DataFrame and
MLflow's schema enforcement (already done by `serving.inputs`). The fast path is only kept if,
at warm-up, it returns exactly what `pyfunc.predict` returns for the input example.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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
        import pandas as pd

        if isinstance(raw, pd.DataFrame):
            if len(raw) == n:
                return cls("frame", {str(c): raw[c].to_numpy() for c in raw.columns}, n)
        elif isinstance(raw, pd.Series):
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
        from mlflow.utils.proto_json_utils import _get_jsonable_obj

        return _get_jsonable_obj(self.value, pandas_orient="records")

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


class LoadedModel:
    """An MLflow model ready to predict, with its input schema and (maybe) a fast path."""

    def __init__(self, model_dir: Path) -> None:
        import mlflow.pyfunc

        started = time.perf_counter()
        self.model_dir = model_dir
        self.pyfunc = mlflow.pyfunc.load_model(str(model_dir))
        self.load_seconds = time.perf_counter() - started
        metadata = self.pyfunc.metadata
        self.metadata = metadata
        pyfunc_conf = metadata.flavors.get("python_function", {})
        self.loader_module: str = pyfunc_conf.get("loader_module", "")
        self.flavor = self.loader_module.removeprefix("mlflow.") or "python_function"
        self.input_schema = metadata.get_input_schema()
        self.output_schema = metadata.get_output_schema()
        params_schema = metadata.get_params_schema()
        # Params are per request, so a model that takes them is not batched.
        self.schema: TabularSchema | None = None
        if params_schema is None:
            self.schema = tabular_schema(self.input_schema)
        self.fast: Callable[[Rows], Any] | None = None
        if self.schema is not None:
            self.fast = self._fast_path(pyfunc_conf)
        self.mode = "tabular" if self.schema is not None else "generic"

    # --- fast paths --------------------------------------------------------------------------

    def _fast_path(self, pyfunc_conf: dict[str, Any]) -> Callable[[Rows], Any] | None:
        try:
            if self.loader_module == "mlflow.sklearn":
                return self._sklearn_fast(pyfunc_conf.get("predict_fn", "predict"))
            if self.loader_module == "mlflow.onnx":
                return self._onnx_fast()
        except Exception:
            logger.warning("no fast path for this model; using pyfunc", exc_info=True)
        return None

    def _sklearn_fast(self, predict_fn: str) -> Callable[[Rows], Any] | None:
        estimator = self.pyfunc.get_raw_model()
        fn = getattr(estimator, predict_fn)
        schema = self.schema
        names_in = getattr(estimator, "feature_names_in_", None)
        if schema.matrix_dtype is None:
            return lambda rows: fn(self._frame(rows))
        if names_in is not None and list(names_in) != schema.names:
            return None
        # Fitted on a DataFrame but fed the same columns as a matrix: the values are the same,
        # only scikit-learn's "X does not have valid feature names" warning differs.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        return lambda rows: fn(rows.matrix)

    def _onnx_fast(self) -> Callable[[Rows], Any] | None:
        session = self.pyfunc.get_raw_model()
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

    def predict_pyfunc(self, rows: Rows) -> Outputs:
        """Through MLflow's own `pyfunc.predict` (the reference path)."""
        data = rows.matrix if self.schema.positional else self._frame(rows)
        return Outputs.of(self.pyfunc.predict(data), rows.n)

    def predict(self, rows: Rows) -> Outputs:
        if self.fast is None:
            return self.predict_pyfunc(rows)
        raw = self.fast(rows)
        if isinstance(raw, dict) and "__frame__" in raw:
            frame = raw["__frame__"]
            lengths = {len(v) for v in frame.values()}
            if lengths != {rows.n}:
                raise ValueError(f"model outputs have lengths {sorted(lengths)} for {rows.n} rows")
            return Outputs("frame", frame, rows.n)
        return Outputs.of(raw, rows.n)

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
            text = self.metadata.get_serving_input(str(self.model_dir))
        except Exception:
            logger.warning("cannot read the model's input example", exc_info=True)
            return None
        return json.loads(text) if text else None

    def check_fast_path(self, rows: Rows) -> None:
        """Keep the fast path only if it answers exactly like pyfunc on these rows."""
        if self.fast is None:
            return
        reference = self.predict_pyfunc(rows)
        try:
            fast = self.predict(rows)
            same = dumps(fast.predictions()) == dumps(reference.predictions())
        except Exception:
            logger.warning("fast path failed on the input example", exc_info=True)
            same = False
        if not same:
            logger.warning("fast path disagrees with pyfunc on the input example; not using it")
            self.fast = None


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
