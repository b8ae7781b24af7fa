"""Loading scikit-learn and ONNX models without MLflow: the same files, read the same way.

A server's cold start is mostly imports, and `mlflow.pyfunc` alone takes seconds. For the two
flavors that have a fast path, these loaders read the model file exactly as `mlflow.sklearn` and
`mlflow.onnx` (MLflow 3) do: the same deserializer, the same trusted types, the same
MLFLOW_ALLOW_PICKLE_DESERIALIZATION gate. Whenever MLflow would do something these loaders do
not (code paths, a custom pyfunc predict function, GPU providers, session options, a gate that
refuses or is malformed), they return None and the model loads through `mlflow.pyfunc`, which
then decides (and refuses) as it always did. They never accept a model MLflow would refuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import platform
import sys
from collections.abc import Iterator
from typing import Any

from serving.mlmodel import ModelFile

logger = logging.getLogger("serving.flavors")

# What `mlflow.sklearn` can call through pyfunc: `predict`, or one of these methods of the
# estimator (mlflow.sklearn._SklearnModelWrapper._SUPPORTED_CUSTOM_PREDICT_FN).
SKLEARN_PREDICT_FNS = (
    "predict", "predict_proba", "predict_log_proba", "predict_joint_log_proba", "score",
)  # fmt: skip
SKLEARN_FORMATS = ("skops", "pickle", "cloudpickle")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"

# Optional imports of scikit-learn that predicting with a model loaded by skops on a numeric
# signature never uses: sklearn/utils/fixes.py imports pandas if installed (only to hand it to
# a helper that is given pandas again as an argument); through `all_estimators`, skops imports
# sklearn/utils/_testing.py (pytest, for test markers) and sklearn/callback/_progressbar.py
# (rich, for progress bars while fitting). Together ~0.4 s of a ~1.5 s start.
_UNUSED_OPTIONAL_IMPORTS = ("pandas", "pytest", "rich")


class Direct:
    """A model loaded without MLflow: its loader's name and the raw object."""

    def __init__(self, loader: str, raw: Any, *, sklearn_only: bool = False) -> None:
        self.loader = loader  # "sklearn-skops", "sklearn-pickle", "sklearn-cloudpickle", "onnx"
        self.raw = raw  # the estimator, or the onnxruntime session
        # Loaded by skops with its default trusted types: only scikit-learn, NumPy, SciPy and
        # builtin objects, whose predict answers the same for an array as for a DataFrame of the
        # same values (or raises).
        self.sklearn_only = sklearn_only


def deserialization_allowed() -> bool:
    """MLFLOW_ALLOW_PICKLE_DESERIALIZATION as MLflow reads it (unset means allowed).

    MLflow's exceptions for Databricks runtimes, and its error for a malformed value, are left
    to MLflow: any answer but a clear "allowed" sends the model through `mlflow.pyfunc`.
    """
    raw = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    return raw is None or raw.lower() in ("true", "1")


def _no_code_paths(model: ModelFile, flavor: dict[str, Any]) -> bool:
    # MLflow puts a model's code paths on sys.path before loading it; leave that to MLflow.
    return not model.pyfunc.get("code") and not flavor.get("code")


def load_sklearn(model: ModelFile, *, numeric: bool) -> Direct | None:
    """The estimator as `mlflow.sklearn._load_pyfunc` loads it, or None to load through MLflow.

    numeric: the signature is all-numeric, so predictions never need pandas.
    """
    flavor = model.flavors.get("sklearn")
    pyfunc = model.pyfunc
    if flavor is None or model.loader_module != "mlflow.sklearn" or "model_path" not in pyfunc:
        return None
    if not _no_code_paths(model, flavor):
        return None
    if pyfunc.get("predict_fn", "predict") not in SKLEARN_PREDICT_FNS:
        return None
    serialization_format = flavor.get("serialization_format", "pickle")
    if serialization_format not in SKLEARN_FORMATS or not deserialization_allowed():
        return None
    path = model.directory / pyfunc["model_path"]
    if not path.is_file():
        return None
    _warn_if_python_differs(pyfunc.get("python_version"))
    if serialization_format == "skops":
        trusted = flavor.get("skops_trusted_types")
        sklearn_only = not trusted
        refused = _UNUSED_OPTIONAL_IMPORTS if numeric and sklearn_only else ()
        with _refusing_imports(refused):
            import skops.io

            raw = skops.io.load(path, trusted=trusted)
    else:
        sklearn_only = False
        with open(path, "rb") as fh:
            if serialization_format == "pickle":
                raw = pickle.load(fh)  # noqa: S301 - what MLflow does, behind the same gate
            else:
                import cloudpickle

                raw = cloudpickle.load(fh)
    _warn_if_sklearn_differs(flavor.get("sklearn_version"))
    return Direct(f"sklearn-{serialization_format}", raw, sklearn_only=sklearn_only)


def load_onnx(model: ModelFile) -> Direct | None:
    """The onnxruntime session as `mlflow.onnx._OnnxModelWrapper` creates it on a CPU-only
    host with default options, or None to load through MLflow."""
    flavor = model.flavors.get("onnx")
    pyfunc = model.pyfunc
    if flavor is None or model.loader_module != "mlflow.onnx" or "data" not in pyfunc:
        return None
    if not _no_code_paths(model, flavor) or flavor.get("onnx_session_options"):
        return None
    path = model.directory / pyfunc["data"]
    if not path.is_file():
        return None
    import onnxruntime

    # MLflow asks for the providers in MLmodel (default: CUDA, then CPU) and keeps those this
    # onnxruntime build has; anything that would not end up as "CPU only" is left to MLflow.
    providers = flavor.get("providers") or [CUDA, CPU]
    if isinstance(providers, str):
        providers = [providers]
    if not all(p in (CUDA, CPU) for p in providers):
        return None
    if CUDA in providers and CUDA in onnxruntime.get_available_providers():
        return None
    _warn_if_python_differs(model.pyfunc.get("python_version"))
    session = onnxruntime.InferenceSession(
        str(path), providers=[CPU], sess_options=onnxruntime.SessionOptions()
    )
    return Direct("onnx", session)


@contextlib.contextmanager
def _refusing_imports(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, `import name` raises ImportError (None in sys.modules), for those of
    `names` not imported yet; afterwards they import normally again."""
    refused = [name for name in names if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in refused:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _warn_if_python_differs(saved: Any) -> None:
    # mlflow.pyfunc.load_model warns the same way.
    if saved and str(saved).split(".")[:2] != platform.python_version().split(".")[:2]:
        logger.warning(
            "the model was saved with Python %s and runs on Python %s: it may not load or "
            "predict the same way", saved, platform.python_version(),
        )  # fmt: skip


def _warn_if_sklearn_differs(saved: Any) -> None:
    import sklearn

    if saved and saved != sklearn.__version__:
        logger.warning(
            "the model was saved with scikit-learn %s and runs on %s",
            saved, sklearn.__version__,
        )  # fmt: skip
