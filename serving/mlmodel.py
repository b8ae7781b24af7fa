"""The `MLmodel` file of a model directory, read without MLflow.

Importing MLflow takes seconds, so what the server needs before it knows how to load the model
(flavors, signature, input example) comes from the YAML file itself. The signature stays in
the JSON form MLflow writes; `serving.inputs.tabular_schema` reads its inputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MLMODEL = "MLmodel"


class MLmodelError(Exception):
    """The MLmodel file is missing or not what MLflow writes."""


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """What the server reads from one model directory's `MLmodel`."""

    directory: Path
    flavors: dict[str, dict[str, Any]]
    # The signature as MLflow serializes it: lists of column / tensor specs, or None.
    inputs: list[dict[str, Any]] | None
    outputs: list[dict[str, Any]] | None
    has_params: bool
    serving_input_path: str | None

    @property
    def pyfunc(self) -> dict[str, Any]:
        return self.flavors.get("python_function") or {}

    @property
    def loader_module(self) -> str:
        return self.pyfunc.get("loader_module") or ""

    @property
    def flavor(self) -> str:
        """The flavor served: the pyfunc loader module without "mlflow." (sklearn, onnx...)."""
        return self.loader_module.removeprefix("mlflow.") or "python_function"

    def output_specs(self) -> list[tuple[str, Any]]:
        """(name, type) of each output: a numpy dtype for tensors, else MLflow's type name."""
        import numpy as np

        specs = []
        for spec in self.outputs or []:
            if spec.get("type") == "tensor":
                kind: Any = np.dtype(spec["tensor-spec"]["dtype"])
            else:
                kind = spec.get("type") if isinstance(spec.get("type"), str) else "object"
            specs.append((spec.get("name") or "predict", kind))
        return specs

    def serving_example(self) -> dict[str, Any] | None:
        """The input example as a scoring request body (as `Model.get_serving_input` reads it)."""
        if self.serving_input_path is None:
            return None
        text = (self.directory / self.serving_input_path).read_text()
        return json.loads(text) if text else None


def read(directory: Path) -> ModelFile:
    import yaml

    try:
        text = (directory / MLMODEL).read_text()
    except OSError as exc:
        raise MLmodelError(f"cannot read {directory / MLMODEL}: {exc}") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise MLmodelError(f"{directory / MLMODEL} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise MLmodelError(f"{directory / MLMODEL} has no flavors")
    signature = doc.get("signature") or {}
    example = doc.get("saved_input_example_info") or {}
    return ModelFile(
        directory=directory,
        flavors=doc["flavors"],
        inputs=_specs(signature.get("inputs")),
        outputs=_specs(signature.get("outputs")),
        has_params=bool(signature.get("params")),
        serving_input_path=example.get("serving_input_path"),
    )


def _specs(raw: Any) -> list[dict[str, Any]] | None:
    if not raw:
        return None
    specs = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise MLmodelError(f"unexpected signature specs: {str(raw)[:200]}")
    return specs
