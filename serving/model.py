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
from serving.fastjson import default as _json_default
from serving.fastjson import stdlib_dumps as dumps
from serving.inputs import NUMERIC_DTYPES, Rows, TabularSchema, tabular_schema

logger = logging.getLogger("serving.model")

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

# The prediction methods a request may choose with `predict_method`, where the model has them.
PREDICT_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function")
# Loaders whose raw model is the user's own PythonModel: its methods take (context, input), and a
# choice of method reaches it only through its own params schema.
_CUSTOM_LOADERS = ("mlflow.pyfunc.model",)

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


class Method:
    """One way a loaded model predicts: its fast path (or None), its reference path (predict on
    the DataFrame MLflow would build), and whether the fast path answers as the reference does by
    construction (no comparison at warm-up)."""

    __slots__ = ("fast", "reference", "exact")

    def __init__(
        self,
        fast: Callable[[Rows], Any] | None,
        reference: Callable[[Rows], Outputs],
        exact: bool = False,
    ) -> None:
        self.fast = fast
        self.reference = reference
        self.exact = exact


class UnsupportedMethod(ValueError):
    """The prediction method asked for is not one this model has."""


class LoadedModel:
    """A model ready to predict, with its input schema and (maybe) a fast path per method.

    `loader` says how it was loaded: "sklearn-skops", "sklearn-pickle", "sklearn-cloudpickle"
    or "onnx" without MLflow (`serving.flavors`), else "pyfunc" (`mlflow.pyfunc.load_model`).

    `methods` maps a prediction method to how it runs; the key None is what the model's own
    pyfunc `predict` answers (for scikit-learn, the MLmodel's `predict_fn`; for an ONNX model,
    every output). `default_method` is what a request that names none gets.
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
        self.methods: dict[str | None, Method] = {None: Method(None, self._pyfunc_reference)}
        self.default_method: str | None = None
        # generic path: the params schema declares `predict_method`, so MLflow hands it over
        self._method_param = False
        direct = self._load_direct() if self.schema is not None else None
        if direct is not None:
            self.loader = direct.loader
        else:
            self.loader = "pyfunc"
            self._load_pyfunc()
        self.load_seconds = time.perf_counter() - started

    @property
    def fast(self) -> Callable[[Rows], Any] | None:
        """The fast path of what a request that names no method gets."""
        return self.methods[self.default_method].fast

    # --- prediction methods ------------------------------------------------------------------

    def supported_methods(self) -> list[str]:
        return [m for m in PREDICT_METHODS if m in self.methods] + sorted(
            m for m in self.methods if m is not None and m not in PREDICT_METHODS
        )

    def resolve_method(self, requested: Any) -> str | None:
        """The method a request asked for (None: the default); a 400 if the model lacks it."""
        if requested is None:
            return self.default_method
        if not isinstance(requested, str):
            raise bad_request("invalid_predict_method", "predict_method must be a string")
        if requested in self.methods or self._method_param:
            return requested
        raise bad_request("unsupported_predict_method", self._unsupported(requested))

    def set_default_method(self, method: str | None) -> None:
        """The server's default (SERVING_PREDICT_METHOD); UnsupportedMethod if the model lacks it."""
        if method is not None and method not in self.methods and not self._method_param:
            raise UnsupportedMethod(self._unsupported(method))
        self.default_method = method

    def _unsupported(self, method: str) -> str:
        return (
            f"predict_method {method!r} is not supported by this model; "
            f"supported: {', '.join(self.supported_methods())}"
        )

    # --- loading -----------------------------------------------------------------------------

    def _load_direct(self) -> flavors.Direct | None:
        """Load without MLflow if `serving.flavors` can; set the fast and reference paths."""
        try:
            direct, methods = None, None
            if self.file.loader_module == "mlflow.sklearn":
                numeric = self.schema.matrix_dtype is not None
                direct = flavors.load_sklearn(self.file, numeric=numeric)
                methods = self._sklearn_methods(direct) if direct is not None else None
            elif self.file.loader_module == "mlflow.onnx":
                direct = flavors.load_onnx(self.file)
                methods = self._onnx_methods(direct.raw) if direct is not None else None
        except Exception:
            logger.warning(
                "cannot load the model without MLflow; using mlflow.pyfunc", exc_info=True
            )
            return None
        if methods is None:
            return None
        self.methods = methods
        return direct

    def _load_pyfunc(self) -> None:
        import mlflow.pyfunc

        self.pyfunc = mlflow.pyfunc.load_model(str(self.model_dir))
        self.input_schema = self.pyfunc.metadata.get_input_schema()
        loader = self.file.loader_module
        if self.schema is None:
            params = self.pyfunc.metadata.get_params_schema()
            names = {p.name for p in params.params} if params is not None else set()
            self._method_param = "predict_method" in names
            # Only names here: `predict_generic` calls pyfunc.predict for "predict", the raw
            # model's method of that name for the others.
            self.methods["predict"] = self.methods[None]
            raw = self._raw_model() if loader not in _CUSTOM_LOADERS else None
            for name in PREDICT_METHODS[1:]:
                if raw is not None and callable(getattr(raw, name, None)):
                    self.methods[name] = self.methods[None]
            return
        try:
            if loader == "mlflow.sklearn":
                estimator = self.pyfunc.get_raw_model()
                default = self.file.pyfunc.get("predict_fn", "predict")
                for name in _sklearn_names(estimator, default):
                    fn = getattr(estimator, name)
                    method = Method(self._sklearn_fast(estimator, fn), self._frame_reference(fn))
                    if name == default:
                        method.reference = self._pyfunc_reference
                        self.methods[None] = method
                    self.methods[name] = method
            elif loader == "mlflow.onnx":
                methods = self._onnx_methods(self.pyfunc.get_raw_model())
                if methods is not None:
                    self.methods = methods
            elif loader not in _CUSTOM_LOADERS:
                # Other flavors (XGBoost, LightGBM...): `predict` is MLflow's pyfunc; the other
                # methods are the raw model's own, on the DataFrame MLflow would build.
                self.methods["predict"] = self.methods[None]
                raw = self._raw_model()
                for name in PREDICT_METHODS[1:]:
                    fn = getattr(raw, name, None) if raw is not None else None
                    if callable(fn):
                        self.methods[name] = Method(None, self._frame_reference(fn))
        except Exception:
            logger.warning("no fast path for this model; using pyfunc", exc_info=True)
        self.methods.setdefault("predict", self.methods[None])

    def _raw_model(self) -> Any:
        try:
            return self.pyfunc.get_raw_model()
        except Exception:  # flavors without a raw model
            return None

    def _frame_reference(self, fn: Callable) -> Callable[[Rows], Outputs]:
        def reference(rows: Rows) -> Outputs:
            data = rows.matrix if self.schema.positional else self._frame(rows)
            return Outputs.of(fn(data), rows.n)

        return reference

    def _sklearn_methods(self, direct: flavors.Direct) -> dict[str | None, Method]:
        estimator = direct.raw
        default = self.file.pyfunc.get("predict_fn", "predict")
        methods: dict[str | None, Method] = {}
        for name in _sklearn_names(estimator, default):
            fn = getattr(estimator, name)

            def reference(rows: Rows, fn: Callable = fn) -> Outputs:
                # what mlflow.sklearn's pyfunc calls once MLflow enforced the schema
                return Outputs.of(fn(self._frame(rows)), rows.n)

            if self.schema.matrix_dtype is None:
                method = Method(None, reference)
            else:
                method = Method(self._sklearn_fast(estimator, fn), reference, direct.sklearn_only)
            methods[name] = method
            if name == default:
                methods[None] = method
        return methods

    def _onnx_methods(self, session: Any) -> dict[str | None, Method] | None:
        fast = self._onnx_fast(session)
        if fast is None:
            return None  # several inputs: left to MLflow's DataFrame handling
        everything = Method(fast, lambda rows: _outputs(fast(rows), rows.n), True)
        methods: dict[str | None, Method] = {None: everything}
        classifier = _onnx_classifier_outputs(session.get_outputs())
        if classifier is None:
            methods["predict"] = everything
            return methods
        for name, output in zip(("predict", "predict_proba"), classifier, strict=True):
            only = self._onnx_fast(session, [output])
            methods[name] = Method(only, lambda rows, only=only: _outputs(only(rows), rows.n), True)
        return methods

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
        from sklearn import get_config, set_config

        def predict(rows: Rows) -> Any:
            # In column-major order, as numpy holds a DataFrame's values: BLAS then sums in the
            # same order, so probabilities and scores equal the DataFrame's to the last bit.
            matrix = np.asfortranarray(rows.matrix)
            # scikit-learn's own check that the values are finite (~10 us a call) is skipped
            # only when this check (~1 us) found them finite: the answer is the same, and any
            # NaN or infinity still meets the estimator's own check (its error, or its NaN
            # support). The setting is per thread and restored at once.
            if get_config()["assume_finite"] or not np.isfinite(matrix).all():
                return fn(matrix)
            set_config(assume_finite=True)
            try:
                return fn(matrix)
            finally:
                set_config(assume_finite=False)

        return predict

    def _onnx_fast(
        self, session: Any, output_names: list[str] | None = None
    ) -> Callable[[Rows], Any] | None:
        inputs = session.get_inputs()
        if len(inputs) != 1 or self.schema.matrix_dtype is None:
            return None
        input_name = inputs[0].name
        to_float32 = inputs[0].type == "tensor(float)"
        if output_names is None:
            output_names = [o.name for o in session.get_outputs()]

        def predict(rows: Rows) -> Any:
            matrix = rows.matrix
            if to_float32 and matrix.dtype == np.float64:
                matrix = matrix.astype(np.float32)
            results = session.run(output_names, {input_name: matrix})
            return {"__frame__": dict(zip(output_names, results, strict=True))}

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

    def predict_reference(self, rows: Rows, method: str | None = None) -> Outputs:
        """What MLflow's own `pyfunc.predict` answers (through it, or through what it calls)."""
        return self.methods[method].reference(rows)

    def predict(self, rows: Rows, method: str | None = None) -> Outputs:
        """method: a key of `methods` (resolved by `resolve_method`)."""
        paths = self.methods[method]
        if paths.fast is None:
            return paths.reference(rows)
        return _outputs(paths.fast(rows), rows.n)

    def predict_generic(
        self, payload: Any, content_type: str, method: str | None = None
    ) -> tuple[Outputs, Any]:
        """Any pyfunc model: MLflow's own parsing and predict; returns outputs and the input.

        method: resolved by `resolve_method`; a model whose params schema declares
        `predict_method` gets it as that param, others the raw model's method of that name."""
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
        raw_method = None
        if self._method_param:
            if method is not None:
                params = {**(params or {}), "predict_method": method}
        elif params and "predict_method" in params:
            params = {k: v for k, v in params.items() if k != "predict_method"}
        if method not in (None, "predict") and not self._method_param:
            raw_method = getattr(self.pyfunc.get_raw_model(), method)
        try:
            if raw_method is not None:
                raw = raw_method(data)
            elif params:
                raw = self.pyfunc.predict(data, params=params)
            else:
                raw = self.pyfunc.predict(data)
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
        """Keep each method's fast path only if it answers exactly like its reference on these
        rows (or, when it does by construction, if it runs)."""
        checked: set[int] = set()
        for name, paths in self.methods.items():
            if paths.fast is None or id(paths) in checked:
                continue
            checked.add(id(paths))
            label = name or "the default method"
            if paths.exact:
                try:
                    _outputs(paths.fast(rows), rows.n)
                except Exception:
                    logger.warning(
                        "fast path of %s failed on the input example; not using it",
                        label,
                        exc_info=True,
                    )
                    paths.fast = None
                continue
            try:
                reference = paths.reference(rows)
            except Exception:
                # the reference itself fails on the example (e.g. a method this estimator
                # refuses at predict time): leave the method to answer as it does
                logger.warning("%s failed on the input example", label, exc_info=True)
                paths.fast = None
                continue
            try:
                fast = _outputs(paths.fast(rows), rows.n)
                same = dumps(fast.predictions()) == dumps(reference.predictions())
            except Exception:
                logger.warning("fast path of %s failed on the input example", label, exc_info=True)
                same = False
            if not same:
                logger.warning(
                    "fast path of %s disagrees with the reference on the input example; "
                    "not using it",
                    label,
                )
                paths.fast = None


def _sklearn_names(estimator: Any, default: str) -> list[str]:
    """The methods of a scikit-learn estimator a request may ask for, its pyfunc default first."""
    names = [default]
    for name in PREDICT_METHODS:
        # hasattr is False for methods scikit-learn marks unavailable (`available_if`), such as
        # predict_proba of an SVC fitted without probability=True
        if name != default and callable(getattr(estimator, name, None)):
            names.append(name)
    return names


def _onnx_classifier_outputs(outputs: list[Any]) -> tuple[str, str] | None:
    """(label, probabilities) output names of an ONNX classifier, as skl2onnx and onnxmltools
    export them (with or without ZipMap), or None."""
    if len(outputs) != 2:
        return None
    label, proba = outputs
    if label.type not in ("tensor(int64)", "tensor(int32)", "tensor(string)"):
        return None
    if proba.type in ("tensor(float)", "tensor(double)") or proba.type.startswith("seq(map("):
        return label.name, proba.name
    return None


def _outputs(raw: Any, n: int) -> Outputs:
    """Outputs of a fast path: as `Outputs.of`, or the columns of an ONNX model's outputs.

    An output of n values (shape (n,) or (n, 1)) is one column, as MLflow's ONNX pyfunc flattens
    it; one of shape (n, k, ...) is a column of per-row values (probabilities, logits)."""
    if isinstance(raw, dict) and "__frame__" in raw:
        frame = {}
        for name, value in raw["__frame__"].items():
            arr = np.asarray(value)
            if arr.size == n and arr.ndim >= 1:
                arr = arr.reshape(-1)
            elif arr.ndim < 2 or arr.shape[0] != n:
                shapes = [list(np.shape(v)) for v in raw["__frame__"].values()]
                raise ValueError(f"model outputs have shapes {shapes} for {n} rows")
            frame[name] = arr
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
