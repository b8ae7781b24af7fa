"""Edge bundles: an ONNX version as one zip that runs anywhere onnxruntime does.

The zip holds ``model.onnx``, ``signature.json``, ``input_example.json``, ``requirements.txt``
(onnxruntime and numpy, pinned as the version's own requirements pin them), ``run.py`` (a short
runner using onnxruntime and numpy only) and ``MANIFEST.sha256`` (``sha256sum`` format over
every other file; ``run.py`` checks it before loading anything)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import zipfile
from pathlib import Path

import yaml

from controlplane.lib.errors import Conflict

from .mlflow_store import MlflowStoreError, get_store
from .models import ModelVersion

RUNNER = Path(__file__).resolve().parent / "bundle_runner.py"
_PIN = re.compile(r"^(onnxruntime|numpy)\s*==\s*([A-Za-z0-9.+!-]+)$", re.I)


def is_onnx(mv: ModelVersion) -> bool:
    return "onnx" in (mv.flavors or [])


def _requirements(mv: ModelVersion) -> list[str]:
    pins = {}
    for line in mv.requirements or []:
        match = _PIN.match(line.strip())
        if match:
            pins[match.group(1).lower()] = f"{match.group(1).lower()}=={match.group(2)}"
    return [pins.get("onnxruntime", "onnxruntime"), pins.get("numpy", "numpy")]


def model_version_bundle(*, mv: ModelVersion) -> bytes:
    """The zip of ``mv`` (an ONNX version); Conflict (409) for any other flavor."""
    if not is_onnx(mv):
        shown = ", ".join(f for f in mv.flavors or [] if f != "python_function") or "none"
        raise Conflict(
            f"{mv} is not an ONNX model (flavors: {shown}): convert it first "
            '(POST .../convert {"target": "onnx"})',
            code="not_onnx",
        )
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        try:
            model_dir = get_store().download_version(mv.model.name, mv.version, Path(tmp))
        except MlflowStoreError as exc:
            raise Conflict(f"the files of {mv} cannot be read: {exc}", code="unavailable") from exc
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
        data = ((mlmodel.get("flavors") or {}).get("onnx") or {}).get("data") or "model.onnx"
        onnx_file = model_dir / data
        if not re.match(r"^[A-Za-z0-9._-]+$", str(data)) or not onnx_file.is_file():
            raise Conflict(f"{mv} has no ONNX file ({data})", code="not_onnx")
        files = {
            "model.onnx": onnx_file.read_bytes(),
            "signature.json": json.dumps(mv.signature or {}, indent=1).encode(),
            "input_example.json": json.dumps(mv.input_example, indent=1).encode(),
            "requirements.txt": ("\n".join(_requirements(mv)) + "\n").encode(),
            "run.py": RUNNER.read_bytes(),
            "README.txt": (
                f"{mv.model.name} version {mv.version} (ONNX)\n\n"
                "    python -m venv env && env/bin/pip install -r requirements.txt\n"
                "    env/bin/python run.py                 # predicts input_example.json\n"
                "    env/bin/python run.py rows.json       # or your own rows\n\n"
                "run.py checks MANIFEST.sha256 first.\n"
            ).encode(),
        }
    manifest = "".join(
        f"{hashlib.sha256(content).hexdigest()}  {name}\n"
        for name, content in sorted(files.items())
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        zf.writestr("MANIFEST.sha256", manifest)
    return buffer.getvalue()
