"""Convert one MLflow model to ONNX, verify and benchmark it: run in the model's own
environment (its requirements plus the converters), inside the sandbox, never in the control
plane's processes.

    python convert_model.py REQUEST_JSON

The request (written by registry/conversion/runner.py) names the model directory, the output
directory, the rows to verify on, the tolerances and the conversion options. This script
writes, in the output directory:

- ``model.onnx``: the converted (and, if asked, quantized) model;
- ``model/``: it saved as an MLflow ``onnx`` flavor model (served by serving/'s ONNX fast path);
- ``report.json``: ``{"ok": true, "converter": ..., "verification": ..., "benchmark": ...}``,
  or ``{"ok": false, "stage": ..., "reason": ...}`` (exit code 3) when the model cannot be
  converted or the converted model does not match the original within the tolerances.

Progress goes to stdout as JSON lines ``{"log": "..."}``. Imports only the standard library,
numpy, MLflow (skinny) and the converter of the model's flavor: no Django, nothing of the
control plane.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

EXIT_REFUSED = 3
EXIT_ORPHANED = 4
PR_SET_PDEATHSIG = 1
LATENCY_CALLS = 200
THROUGHPUT_ROWS = 1000
BENCHMARK_SECONDS = 1.5  # per measurement (4 of them); the request's benchmark_seconds


class Refused(Exception):
    """The model cannot be converted or verified; ``stage`` says where, the message why."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(json.dumps({"log": f"[{time.monotonic() - _STARTED:.1f}s] {message}"}), flush=True)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _short(exc: BaseException, limit: int = 600) -> str:
    """The converter's own reason, without pages of node attributes."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 3:
        text = "\n".join(lines[:2] + ["...", lines[-1]])
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- loading the original ---------------------------------------------------------------------

NATIVE = ("sklearn", "xgboost", "lightgbm", "pytorch", "keras", "tensorflow")


def flavor_of(model_dir: Path) -> tuple[str, dict]:
    import yaml

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    flavors = mlmodel.get("flavors") or {}
    if "onnx" in flavors:
        raise Refused("load", "the model is already an ONNX model")
    for name in NATIVE:
        if name in flavors:
            return name, flavors[name]
    shown = ", ".join(sorted(k for k in flavors if k != "python_function")) or "python_function"
    raise Refused(
        "load",
        f"no ONNX converter for flavor {shown}: scikit-learn, XGBoost, LightGBM, PyTorch and "
        "Keras models can be converted",
    )


def load_native(flavor: str, model_dir: Path):
    if flavor == "sklearn":
        import mlflow.sklearn

        return mlflow.sklearn.load_model(str(model_dir))
    if flavor == "xgboost":
        import mlflow.xgboost

        return mlflow.xgboost.load_model(str(model_dir))
    if flavor == "lightgbm":
        import mlflow.lightgbm

        return mlflow.lightgbm.load_model(str(model_dir))
    if flavor == "pytorch":
        import mlflow.pytorch

        model = mlflow.pytorch.load_model(str(model_dir))
        try:
            model.eval()
        except (AttributeError, NotImplementedError):
            pass  # a torch.export graph (MLflow 3's "pt2" format) has no train/eval modes
        return model
    if flavor == "keras":  # MLflow 3's Keras 3 flavor (mlflow.keras)
        import mlflow.keras

        return mlflow.keras.load_model(str(model_dir))
    import mlflow.tensorflow

    return mlflow.tensorflow.load_model(str(model_dir))


class Original:
    """The model in its own framework: predictions as {output name: array}."""

    def __init__(self, flavor: str, model, columns: list[str] | None, dtypes: list[str]) -> None:
        self.flavor = flavor
        self.model = model
        self.columns = columns
        self.dtypes = dtypes
        est = model.steps[-1][1] if hasattr(model, "steps") else model
        self.classifier = flavor in ("sklearn", "xgboost", "lightgbm") and hasattr(
            est, "predict_proba"
        )
        if self.classifier and not hasattr(est, "classes_"):
            self.classifier = False
        self.neural = flavor in ("pytorch", "keras", "tensorflow")

    def frame(self, X: np.ndarray):
        if self.columns is None:
            return X
        import pandas as pd

        return pd.DataFrame(
            {
                c: X[:, j].astype(self.dtypes[j] if self.dtypes[j] else np.float64)
                for j, c in enumerate(self.columns)
            }
        )

    def predict(self, X: np.ndarray) -> dict[str, np.ndarray]:
        if self.neural:
            return {"output": self._neural(X)}
        data = self.frame(X)
        if self.classifier:
            return {
                "label": np.asarray(self.model.predict(data)),
                "probabilities": np.asarray(self.model.predict_proba(data)),
            }
        return {"output": np.asarray(self.model.predict(data))}

    def _neural(self, X: np.ndarray) -> np.ndarray:
        X = X.astype(np.float32)
        if self.flavor == "pytorch":
            import torch

            with torch.no_grad():
                out = self.model(torch.from_numpy(X))
            return out.detach().numpy()
        return np.asarray(self.model.predict(X, verbose=0))

    def raw_call(self):
        """A callable for benchmarking that does what a server's predict does."""
        if self.neural:
            return self._neural
        if self.classifier:
            return lambda X: self.model.predict_proba(self.frame(X))
        return lambda X: self.model.predict(self.frame(X))


# --- converting -------------------------------------------------------------------------------


def _final_estimator(model):
    return model.steps[-1][1] if hasattr(model, "steps") else model


def convert(original: Original, n_features: int, opset: int | None):
    """(onnx ModelProto, converter label) or Refused with the converter's reason."""
    flavor, model = original.flavor, original.model
    try:
        if flavor == "sklearn":
            import skl2onnx
            from skl2onnx import convert_sklearn
            from skl2onnx.common.data_types import FloatTensorType

            options = {}
            if original.classifier:
                # ZipMap off: probabilities stay one float tensor (ZipMap's list of dicts made
                # onnxruntime slower than scikit-learn at large batches).
                options = {id(_final_estimator(model)): {"zipmap": False}}
            onx = convert_sklearn(
                model,
                initial_types=[("input", FloatTensorType([None, n_features]))],
                target_opset=opset,
                options=options,
            )
            return onx, f"skl2onnx {skl2onnx.__version__}"
        if flavor in ("xgboost", "lightgbm"):
            import onnxmltools
            from onnxmltools.convert.common.data_types import FloatTensorType

            types = [("input", FloatTensorType([None, n_features]))]
            if flavor == "xgboost":
                import copy

                model = copy.deepcopy(model)  # the original keeps its names (benchmark)
                booster = model.get_booster() if hasattr(model, "get_booster") else model
                booster.feature_names = None  # onnxmltools wants f0, f1, ... or none
                onx = onnxmltools.convert_xgboost(model, initial_types=types, target_opset=opset)
            else:
                onx = onnxmltools.convert_lightgbm(
                    model, initial_types=types, target_opset=opset, zipmap=False
                )
            return onx, f"onnxmltools {onnxmltools.__version__}"
        if flavor == "pytorch":
            return _convert_torch(model, n_features, opset)
        return _convert_keras(model, n_features, opset)
    except Refused:
        raise
    except Exception as exc:  # the converter's reason is the refusal
        raise Refused("convert", _short(exc)) from exc


def _convert_torch(model, n_features: int, opset: int | None):
    """torch.onnx.export: the dynamo exporter (which also takes MLflow 3's torch.export
    graphs), else the TorchScript one; the dynamo exporter's reason if both fail."""
    import tempfile

    import onnx
    import torch

    sample = torch.zeros((2, n_features), dtype=torch.float32)
    kwargs = {"opset_version": opset} if opset else {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                model,
                (sample,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                **kwargs,
            )
        except Exception as first:
            try:
                torch.onnx.export(
                    model,
                    (sample,),
                    str(path),
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                    dynamo=False,
                    **kwargs,
                )
            except Exception:
                raise first from None
        onx = onnx.load(str(path))
    return onx, f"torch.onnx {torch.__version__}"


def _convert_keras(model, n_features: int, opset: int | None):
    """tf2onnx on the model's call traced as a tf.function: ``from_keras`` looks its outputs
    up by Keras 2 tensor names and fails on every Keras 3 model ("KeyError: 'keras_tensor_N'",
    onnx/tensorflow-onnx#2448). The dict output names the ONNX output "output", as
    torch.onnx.export's is named."""
    import tensorflow as tf
    import tf2onnx

    if not callable(model):
        raise Refused("convert", f"the loaded model ({type(model).__name__}) is not callable")
    spec = (tf.TensorSpec((None, n_features), tf.float32, name="input"),)
    function = tf.function(
        lambda x: {"output": model(x, training=False)}, input_signature=spec, autograph=False
    )
    onx, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    return onx, f"tf2onnx {tf2onnx.__version__}"


def quantize(onx, quantization: str, original: Original):
    if quantization != "dynamic-int8":
        raise Refused("quantize", f"unknown quantization {quantization!r} (dynamic-int8)")
    if not original.neural:
        raise Refused(
            "quantize",
            "dynamic-int8 quantization is for neural networks (PyTorch, Keras); this is a "
            f"{original.flavor} model",
        )
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(onx, str(src))
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        except Exception as exc:
            raise Refused("quantize", _short(exc)) from exc
        return onnx.load(str(dst))


# --- verifying --------------------------------------------------------------------------------


def session_for(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def onnx_predict(session, X: np.ndarray, original: Original) -> dict[str, np.ndarray]:
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    results = session.run(outputs, {name: X.astype(np.float32)})
    if original.classifier:
        if len(results) < 2:
            raise Refused("verify", f"the converted classifier has outputs {outputs}")
        return {"label": np.asarray(results[0]), "probabilities": np.asarray(results[1])}
    return {"output": np.asarray(results[0])}


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise Refused("verify", f"output shapes differ: original {a.shape}, converted {b.shape}")
    diff = np.abs(a - b)
    return float(diff.max()) if diff.size else 0.0, float(diff.mean()) if diff.size else 0.0


def verify(
    original: Original,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    tolerances: dict,
    labels: np.ndarray | None,
) -> dict:
    report: dict = {"rows": int(len(next(iter(expected.values())))), "tolerances": tolerances}
    failures = []
    if original.classifier:
        want = np.asarray(expected["label"]).reshape(-1)
        have = np.asarray(got["label"]).reshape(-1)
        agreement = float(np.mean(want.astype(str) == have.astype(str)))
        report["kind"] = "classification"
        report["label_agreement"] = agreement
        max_abs, mean_abs = _errors(expected["probabilities"], got["probabilities"])
        report["probability_max_abs_error"] = max_abs
        report["probability_mean_abs_error"] = mean_abs
        if agreement < tolerances["label_agreement_min"]:
            failures.append(
                f"label agreement {agreement:.4f} < {tolerances['label_agreement_min']}"
            )
        if max_abs > tolerances["probability_max_abs_error"]:
            failures.append(
                f"probability max abs error {max_abs:.3g} > "
                f"{tolerances['probability_max_abs_error']}"
            )
        predicted_orig, predicted_new = want, have
    else:
        max_abs, mean_abs = _errors(expected["output"], got["output"])
        out = np.asarray(expected["output"], dtype=np.float64)
        scale = max(1.0, float(np.abs(out).max())) if out.size else 1.0
        report["kind"] = "regression" if not original.neural else "tensor"
        report["max_abs_error"] = max_abs
        report["mean_abs_error"] = mean_abs
        report["error_scale"] = scale  # tolerances are multiplied by it
        if max_abs > tolerances["max_abs_error"] * scale:
            failures.append(
                f"max abs error {max_abs:.3g} > {tolerances['max_abs_error']} x {scale:.3g}"
            )
        if mean_abs > tolerances["mean_abs_error"] * scale:
            failures.append(
                f"mean abs error {mean_abs:.3g} > {tolerances['mean_abs_error']} x {scale:.3g}"
            )
        predicted_orig = predicted_new = None
        if original.neural and out.ndim == 2 and out.shape[1] > 1:
            predicted_orig = out.argmax(axis=1)
            predicted_new = np.asarray(got["output"]).argmax(axis=1)
            report["argmax_agreement"] = float(np.mean(predicted_orig == predicted_new))
    if labels is not None and predicted_orig is not None and len(labels) <= len(predicted_orig):
        # the labelled reference rows come first
        truth = np.asarray(labels).astype(str)
        n = len(truth)
        before = float(np.mean(np.asarray(predicted_orig[:n]).astype(str) == truth))
        after = float(np.mean(np.asarray(predicted_new[:n]).astype(str) == truth))
        report["accuracy"] = {
            "rows": int(len(truth)),
            "original": before,
            "converted": after,
            "change": after - before,
        }
    report["passed"] = not failures
    report["failures"] = failures
    return report


# --- benchmarking -----------------------------------------------------------------------------


def _latency_p50_ms(fn, row: np.ndarray, seconds: float) -> float:
    fn(row)  # warm
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < LATENCY_CALLS and (time.perf_counter() < deadline or len(times) < 5):
        start = time.perf_counter()
        fn(row)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _throughput(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    runs, started = 0, time.perf_counter()
    while runs < 3 or (time.perf_counter() - started < seconds and runs < 50):
        fn(batch)
        runs += 1
    return float(runs * len(batch) / (time.perf_counter() - started))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def benchmark(
    original: Original, session, X: np.ndarray, model_dir: Path, onnx_path: Path, seconds: float
):
    rng = np.random.default_rng(0)
    batch = X[rng.integers(0, len(X), THROUGHPUT_ROWS)]
    row = X[:1]
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    converted = lambda data: session.run(outputs, {name: data.astype(np.float32)})  # noqa: E731
    native = original.raw_call()
    return {
        "original": {
            "latency_p50_ms_1_row": _latency_p50_ms(native, row, seconds),
            "rows_per_second_1000_rows": _throughput(native, batch, seconds),
            "size_bytes": _dir_size(model_dir),
        },
        "converted": {
            "latency_p50_ms_1_row": _latency_p50_ms(converted, row, seconds),
            "rows_per_second_1000_rows": _throughput(converted, batch, seconds),
            "size_bytes": onnx_path.stat().st_size,
        },
    }


# --- saving -----------------------------------------------------------------------------------


def save_mlflow(onx, out: Path, request: dict) -> None:
    import mlflow.onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema

    signature = None
    inputs = request.get("signature_inputs")
    if inputs:
        signature = ModelSignature(inputs=Schema.from_json(json.dumps(inputs)))
    example = None
    rows = request.get("example_rows")
    if rows:
        example = np.asarray(rows, dtype=np.float32)
        if request.get("columns"):
            import pandas as pd

            example = pd.DataFrame(example, columns=request["columns"])
    mlflow.onnx.save_model(
        onx,
        str(out),
        signature=signature,
        input_example=example,
        pip_requirements=[
            f"onnx=={_version('onnx')}",
            f"onnxruntime=={_version('onnxruntime')}",
            f"numpy=={_version('numpy')}",
        ],
    )


def run(request: dict) -> dict:
    model_dir = Path(request["model_dir"])
    out = Path(request["out_dir"])
    columns = request.get("columns")
    dtypes = request.get("dtypes") or [None] * int(request["n_features"])
    n_features = int(request["n_features"])
    X = np.asarray(request["rows"], dtype=np.float64).reshape(-1, n_features)
    labels = request.get("labels")
    labels = np.asarray(labels) if labels is not None else None
    tolerances = request["tolerances"]

    flavor, conf = flavor_of(model_dir)
    backend = (conf or {}).get("keras_backend") or "tensorflow"
    if flavor == "keras" and backend != "tensorflow":
        raise Refused(
            "convert", f"tf2onnx converts Keras models of the tensorflow backend, not {backend}"
        )
    log(f"loading the {flavor} model in its own environment")
    try:
        native = load_native(flavor, model_dir)
    except Exception as exc:
        raise Refused("load", _short(exc)) from exc
    original = Original(flavor, native, columns, dtypes)
    expected = original.predict(X)

    log(f"converting with the {flavor} converter")
    started = time.perf_counter()
    onx, converter = convert(original, n_features, request.get("opset"))
    quantization = request.get("quantize")
    if quantization:
        log(f"quantizing ({quantization})")
        onx = quantize(onx, quantization, original)
    seconds = time.perf_counter() - started
    opset = max((o.version for o in onx.opset_import if o.domain in ("", "ai.onnx")), default=None)

    import onnx

    onnx_path = out / "model.onnx"
    onnx.save(onx, str(onnx_path))
    log(f"converted in {seconds:.2f} s ({converter}, opset {opset}); verifying on {len(X)} rows")
    session = session_for(onnx_path)
    try:
        got = onnx_predict(session, X, original)
    except Refused:
        raise
    except Exception as exc:
        raise Refused("verify", f"the converted model does not run: {_short(exc)}") from exc
    verification = verify(original, expected, got, tolerances, labels)
    report = {
        "ok": verification["passed"],
        "flavor": flavor,
        "converter": converter,
        "opset": opset,
        "quantization": quantization,
        "conversion_seconds": seconds,
        "verification": verification,
    }
    if not verification["passed"]:
        report["stage"] = "verify"
        report["reason"] = "verification failed: " + "; ".join(verification["failures"])
        return report
    log("verified; benchmarking the original and the converted model")
    seconds = float(request.get("benchmark_seconds") or BENCHMARK_SECONDS)
    report["benchmark"] = benchmark(original, session, X, model_dir, onnx_path, seconds)
    log("saving the converted model (MLflow onnx flavor)")
    save_mlflow(onx, out / "model", request)
    return report


def die_with_parent() -> None:
    """Be SIGKILLed by the kernel when the job's worker that started this process dies
    (PR_SET_PDEATHSIG): a conversion never outlives its worker, so a resumed job never runs
    beside it. Set here, not before the exec: the sandbox's uid change clears it."""
    parent = os.environ.get("CONVERSION_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the worker died before the prctl
        os._exit(EXIT_ORPHANED)


def main(argv: list[str]) -> int:
    die_with_parent()
    request = json.loads(Path(argv[0]).read_text())
    out = Path(request["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    try:
        report = run(request)
    except Refused as exc:
        report = {"ok": False, "stage": exc.stage, "reason": exc.reason}
    except Exception as exc:  # a bug or a broken environment: reported, not hidden
        report = {
            "ok": False,
            "stage": "internal",
            "reason": _short(exc),
            "traceback": traceback.format_exc()[-4000:],
        }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, default=float))
    os.replace(tmp, out / "report.json")
    return 0 if report.get("ok") else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
