"""The rows a conversion is verified and benchmarked on, built from what the registry and the
monitoring already hold about the version (no model code): the input example logged with it,
rows sampled from its drift reference's bins, and rows generated from its signature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConversionFailed

NUMERIC = {
    "double": "float64",
    "float": "float32",
    "long": "int64",
    "integer": "int32",
    "boolean": "bool",
}
TENSOR_DTYPES = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8")


@dataclass
class InputSpec:
    """What the model takes: named numeric columns, or one 2-D numeric tensor."""

    n_features: int
    columns: list[str] | None  # None: a tensor input
    dtypes: list[str | None]
    signature_inputs: list[dict]


def input_spec(signature: dict | None) -> InputSpec:
    inputs = (signature or {}).get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ConversionFailed(
            "the version has no input signature: conversion needs to know the model's inputs "
            "(log the model with a signature)"
        )
    if len(inputs) == 1 and inputs[0].get("type") == "tensor":
        spec = inputs[0].get("tensor-spec") or {}
        shape = spec.get("shape") or []
        if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] <= 0:
            raise ConversionFailed(
                f"the input tensor has shape {shape}: only 2-D (rows, features) inputs convert"
            )
        if spec.get("dtype") not in TENSOR_DTYPES:
            raise ConversionFailed(f"the input tensor has dtype {spec.get('dtype')}: not numeric")
        return InputSpec(shape[1], None, [spec["dtype"]] * shape[1], inputs)
    columns, dtypes = [], []
    for item in inputs:
        kind = item.get("type")
        if kind not in NUMERIC or not item.get("name"):
            raise ConversionFailed(
                f"input {item.get('name') or '?'} is of type {kind}: only named numeric columns "
                "or one numeric tensor can be converted"
            )
        columns.append(str(item["name"]))
        dtypes.append(NUMERIC[kind])
    return InputSpec(len(columns), columns, dtypes, inputs)


def example_rows(example, spec: InputSpec) -> list[list[float]]:
    """The input example as rows in the spec's column order ([] if it has another shape)."""
    if isinstance(example, dict) and len(example) == 1:
        for key in ("dataframe_split", "inputs", "instances", "dataframe_records"):
            if key in example:
                example = example[key]
    rows: list = []
    if isinstance(example, dict) and isinstance(example.get("data"), list):
        names = [str(c) for c in example.get("columns") or []]
        if spec.columns and names:
            try:
                index = [names.index(c) for c in spec.columns]
            except ValueError:
                return []
            rows = [[row[i] for i in index] for row in example["data"] if isinstance(row, list)]
        else:
            rows = example["data"]
    elif isinstance(example, list) and example and all(isinstance(r, dict) for r in example):
        if not spec.columns:
            return []
        rows = [[r.get(c) for c in spec.columns] for r in example]
    elif isinstance(example, list):
        rows = example
    try:
        matrix = np.asarray(rows, dtype=np.float64).reshape(-1, spec.n_features)
    except (TypeError, ValueError):
        return []
    return matrix[np.isfinite(matrix).all(axis=1)].tolist()


def _sample_feature(profile: dict, n: int, rng: np.random.Generator) -> np.ndarray | None:
    if profile.get("kind") != "numeric":
        return None
    edges = np.asarray(profile.get("edges") or [], dtype=np.float64)
    expected = np.asarray(profile.get("expected") or [], dtype=np.float64)
    if expected.size != edges.size + 1 or expected.sum() <= 0:
        return None
    if edges.size == 0:
        return np.zeros(n)
    width = (edges[-1] - edges[0]) / max(edges.size - 1, 1) if edges.size > 1 else 1.0
    lows = np.concatenate([[edges[0] - width], edges])
    highs = np.concatenate([edges, [edges[-1] + width]])
    bins = rng.choice(expected.size, size=n, p=expected / expected.sum())
    return rng.uniform(lows[bins], highs[bins])


def reference_rows(profile: dict, spec: InputSpec, n: int, seed: int = 0) -> list[list[float]]:
    """Rows drawn from a drift reference's per-feature bins (features independently)."""
    if not spec.columns or not profile:
        return []
    rng = np.random.default_rng(seed)
    columns = []
    for name in spec.columns:
        values = _sample_feature(profile.get(name) or {}, n, rng)
        if values is None:
            return []
        columns.append(values)
    return np.column_stack(columns).tolist()


def generated_rows(spec: InputSpec, n: int, like: list[list[float]], seed: int = 1) -> list:
    """Rows generated from the signature: around the example's values where there is one,
    else standard normal; integer and boolean columns rounded."""
    rng = np.random.default_rng(seed)
    if like:
        base = np.asarray(like, dtype=np.float64)
        centre = base.mean(axis=0)
        scale = np.where(base.std(axis=0) > 0, base.std(axis=0), np.maximum(np.abs(centre), 1.0))
    else:
        centre, scale = np.zeros(spec.n_features), np.ones(spec.n_features)
    matrix = rng.normal(centre, scale, size=(n, spec.n_features))
    for j, dtype in enumerate(spec.dtypes):
        if dtype == "bool":
            matrix[:, j] = matrix[:, j] > centre[j]
        elif dtype and dtype.startswith(("int", "uint")):
            matrix[:, j] = np.round(matrix[:, j])
    return matrix.tolist()


def verification_rows(
    *, spec: InputSpec, example, profile: dict | None, n: int
) -> tuple[list[list[float]], dict]:
    """(rows, where they came from): the example's rows, then the reference's, then generated."""
    example_part = example_rows(example, spec)
    reference_part = reference_rows(profile or {}, spec, max(n - len(example_part), 0))
    rows = example_part + reference_part
    generated = generated_rows(spec, max(n - len(rows), 0), example_part)
    rows += generated
    return rows, {
        "input_example": len(example_part),
        "drift_reference": len(reference_part),
        "generated": len(generated),
    }
