"""The ``batch`` job kind: score a table (CSV or Parquet) in chunks through a private model
server running in the model's own environment (jobs/server.py).

Resumable: the input is first copied to ``workdir/input.parquet``; each chunk's scored rows
are written to ``workdir/parts/<chunk>.parquet`` (atomically, by rename) *before* the
checkpoint ``{"next_chunk": k + 1, ...}`` is saved. A worker killed between the two rewrites
that part on resume (same name, same rows); the output is assembled from the parts once all
are done, so no row is in it twice. Row numbers are 1-based data rows (a CSV's header is not
a row).

A chunk the server refuses (4xx/5xx) is split in halves until the bad rows are single rows:
with ``on_error: fail`` the first bad row fails the job with its number and the server's
reason; with ``skip`` bad rows go to the ``errors`` file (row, error, kept columns).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from django.conf import settings

from controlplane.lib import http

from .errors import JobCancelled, JobFailed

FORMATS = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}
DEFAULT_CHUNK_ROWS = 10_000
# With on_error=skip, a job with more bad rows than this fails (something systematic).
MAX_ERROR_ROWS = 1000
REQUEST_TIMEOUT = 300.0


# --- reading inputs (also used at submit time: data only, no model code) -----------------


def read_table(path: Path, fmt: str) -> pa.Table:
    """The whole input as an Arrow table; ValueError with a readable reason if it cannot be."""
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"cannot read the input as {fmt.upper()}: {exc}") from None


def sniff_format(path: Path, filename: str = "") -> str:
    """parquet if the file starts with the Parquet magic bytes, else csv."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head == b"PAR1" or filename.lower().endswith(".parquet"):
        return "parquet"
    return "csv"


def signature_columns(signature: dict | None) -> list[str] | None:
    """The named input columns of a column-based signature, else None (send them all)."""
    inputs = (signature or {}).get("inputs")
    if not isinstance(inputs, list) or not inputs:
        return None
    names = [c.get("name") for c in inputs if isinstance(c, dict)]
    if not all(isinstance(n, str) and n for n in names):
        return None
    return names


def feature_columns(
    columns: list[str], *, signature: dict | None, keep_columns: list[str]
) -> list[str]:
    """What is sent to the model: the signature's columns; without one, every column not
    kept for the output only."""
    named = signature_columns(signature)
    if named is None:
        return [c for c in columns if c not in keep_columns]
    required = [
        c.get("name")
        for c in (signature or {}).get("inputs", [])
        if isinstance(c, dict) and not c.get("optional")
    ]
    missing = [c for c in required if c not in columns]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"the input lacks the model's input column(s) {shown}")
    return [c for c in named if c in columns]


# --- the handler ---------------------------------------------------------------------------


def run(ctx) -> dict:
    from deployments.model_files import ensure_model_files

    spec = ctx.input
    started = time.monotonic()
    chunk_rows = int(spec.get("chunk_rows") or DEFAULT_CHUNK_ROWS)
    out_format = spec.get("format", "csv")
    keep = list(spec.get("keep_columns") or [])
    on_error = spec.get("on_error", "fail")
    work = ctx.workdir
    source = _materialize_input(ctx, work)
    parquet = pq.ParquetFile(source)
    total = parquet.metadata.num_rows
    if total > settings.CONTROLPLANE_BATCH_MAX_ROWS:
        raise JobFailed(
            f"the input has {total} rows; at most {settings.CONTROLPLANE_BATCH_MAX_ROWS} "
            "(CONTROLPLANE_BATCH_MAX_ROWS)"
        )
    columns = parquet.schema_arrow.names
    missing = [c for c in keep if c not in columns]
    if missing:
        raise JobFailed(f"keep_columns not in the input: {', '.join(missing)}")
    try:
        features = feature_columns(columns, signature=spec.get("signature"), keep_columns=keep)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None
    chunks = max(math.ceil(total / chunk_rows), 1) if total else 0
    state = dict(ctx.state)
    next_chunk = int(state.get("next_chunk", 0))
    parts = work / "parts"
    parts.mkdir(exist_ok=True)
    ctx.progress(min(next_chunk * chunk_rows, total), total)
    if next_chunk:
        ctx.log(
            f"resuming at chunk {next_chunk + 1} of {chunks} (row {next_chunk * chunk_rows + 1})"
        )
    try:
        model_dir, sha = ensure_model_files(spec["model"], int(spec["version"]))
    except Exception as exc:
        raise JobFailed(f"cannot fetch the model's files: {exc}") from None

    from .server import model_server

    if next_chunk < chunks:
        with model_server(
            job_id=ctx.job_id,
            attempt=_attempt_of(ctx),
            model_name=spec["model"],
            model_version=str(spec["version"]),
            model_dir=model_dir,
            model_sha256=sha,
            max_batch_size=chunk_rows,
            log=ctx.log,
        ) as address:
            ctx.log(f"scoring {total} rows in {chunks} chunk(s) of {chunk_rows}")
            scorer = _Scorer(address)
            for index, batch in enumerate(parquet.iter_batches(batch_size=chunk_rows)):
                if index < next_chunk:
                    continue
                if ctx.cancelled():
                    raise JobCancelled()
                table = pa.Table.from_batches([batch])
                t0 = time.monotonic()
                scored, bad = scorer.score(table, features, first_row=index * chunk_rows)
                elapsed = time.monotonic() - t0
                if bad and on_error == "fail":
                    row, message = bad[0]
                    raise JobFailed(f"row {row}: {message}")
                _write_part(parts, index, table, scored, keep, bad, first_row=index * chunk_rows)
                errors = int(state.get("errors", 0)) + len(bad)
                if errors > MAX_ERROR_ROWS:
                    raise JobFailed(
                        f"more than {MAX_ERROR_ROWS} rows failed; the first ones: "
                        + "; ".join(f"row {r}: {m}" for r, m in bad[:3])
                    )
                state = {
                    "next_chunk": index + 1,
                    "scored": int(state.get("scored", 0)) + table.num_rows - len(bad),
                    "errors": errors,
                    "scoring_seconds": float(state.get("scoring_seconds", 0.0)) + elapsed,
                }
                ctx.checkpoint(state)
                ctx.progress(min((index + 1) * chunk_rows, total), total)
    output, error_file = _assemble(parts, chunks, out_format, work)
    name = f"{spec['model']}-v{spec['version']}-predictions.{out_format}"
    ctx.set_output(output, filename=name, content_type=FORMATS[out_format])
    errors = int(state.get("errors", 0))
    if error_file is not None:
        ctx.attach("errors", error_file, filename=f"{name}.errors.csv", content_type="text/csv")
    seconds = float(state.get("scoring_seconds", 0.0))
    scored_rows = int(state.get("scored", 0))
    result = {
        "model": spec["model"],
        "version": str(spec["version"]),
        "rows": total,
        "scored": scored_rows,
        "errors": errors,
        "format": out_format,
        "scoring_seconds": round(seconds, 3),
        "rows_per_second": round(scored_rows / seconds, 1) if seconds > 0 else None,
        "wall_seconds_this_run": round(time.monotonic() - started, 3),
    }
    ctx.log(
        f"done: {scored_rows} rows scored, {errors} failed, "
        f"{result['rows_per_second'] or 0:.0f} rows/s"
    )
    return result


def _attempt_of(ctx) -> int:
    from .models import Job

    return Job.objects.filter(pk=ctx.job_id).values_list("attempts", flat=True).first() or 0


def _materialize_input(ctx, work: Path) -> Path:
    """``workdir/input.parquet``, written once (the upload or the MLflow artifact)."""
    target = work / "input.parquet"
    if target.exists():
        return target
    spec = ctx.input
    files = spec.get("files") or {}
    if "input" in files:
        path = Path(files["input"])
    else:
        from registry.mlflow_store import MlflowStoreError, get_store

        download = work / "download"
        download.mkdir(exist_ok=True)
        try:
            path = get_store().download_artifact(spec["input_uri"], download)
        except MlflowStoreError as exc:
            raise JobFailed(f"cannot download {spec['input_uri']}: {exc}") from None
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            if len(found) != 1:
                raise JobFailed(f"{spec['input_uri']} names a directory, not one file")
            path = found[0]
        size = path.stat().st_size
        if size > settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES:
            raise JobFailed(
                f"{spec['input_uri']} is {size} bytes; at most "
                f"{settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES} (CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES)"
            )
    fmt = spec.get("input_format") or sniff_format(path, path.name)
    try:
        table = read_table(path, fmt)
    except ValueError as exc:
        raise JobFailed(str(exc)) from None
    tmp = work / "input.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    ctx.log(f"input: {table.num_rows} rows, {table.num_columns} columns ({fmt})")
    return target


class _Scorer:
    """Scores a table over HTTP, splitting what the server refuses down to single rows."""

    def __init__(self, address: str) -> None:
        self.url = http.address_url(address, "/invocations")

    def score(
        self, table: pa.Table, features: list[str], *, first_row: int
    ) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
        """([(offset in table, prediction)], [(row number, error)])."""
        good: list[tuple[int, Any]] = []
        bad: list[tuple[int, str]] = []
        self._score(table.select(features), 0, table.num_rows, first_row, good, bad)
        return good, bad

    def _score(self, table, offset, length, first_row, good, bad) -> None:
        if length == 0:
            return
        body = _csv_bytes(table.slice(offset, length))
        try:
            resp = http.request(
                "POST",
                self.url,
                data=body,
                headers={"Content-Type": "text/csv"},
                timeout=REQUEST_TIMEOUT,
                raise_for_status=False,
            )
        except http.HttpError as exc:
            raise JobFailed(f"the model server stopped answering: {exc}") from None
        if resp.status == 200:
            predictions = resp.json().get("predictions")
            if not isinstance(predictions, list) or len(predictions) != length:
                raise JobFailed(
                    f"the model answered {len(predictions or [])} predictions for {length} rows"
                )
            good.extend((offset + i, p) for i, p in enumerate(predictions))
            return
        if length == 1 and resp.status != 413:
            bad.append((first_row + offset + 1, _reason(resp)))
            return
        if length == 1:
            raise JobFailed(f"row {first_row + offset + 1} alone is larger than the server takes")
        half = length // 2
        self._score(table, offset, half, first_row, good, bad)
        self._score(table, offset + half, length - half, first_row, good, bad)


def _csv_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def _reason(resp: http.HttpResponse) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code"))[:500]
        if err:
            return str(err)[:500]
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status}: {resp.body[:200].decode(errors='replace')}"


def prediction_columns(predictions: list[Any]) -> dict[str, list[Any]]:
    """``prediction``, or one column per output (dict answers) / per position (lists)."""
    if predictions and all(isinstance(p, dict) for p in predictions):
        keys = list(dict.fromkeys(k for p in predictions for k in p))
        return {str(k): [_cell(p.get(k)) for p in predictions] for k in keys}
    if predictions and all(isinstance(p, list) for p in predictions):
        width = max(len(p) for p in predictions)
        if width == 1:
            return {"prediction": [p[0] if p else None for p in predictions]}
        return {
            f"prediction_{i}": [p[i] if i < len(p) else None for p in predictions]
            for i in range(width)
        }
    return {"prediction": [_cell(p) for p in predictions]}


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _write_part(parts: Path, index: int, table, scored, keep, bad, *, first_row: int) -> None:
    rows = pa.array([offset for offset, _ in scored], type=pa.int64())
    arrays: dict[str, Any] = {}
    if keep:
        kept = table.select(keep).take(rows)
        for name in kept.column_names:
            arrays[name] = kept.column(name)
    for name, values in prediction_columns([p for _, p in scored]).items():
        arrays[name if name not in arrays else f"{name}_predicted"] = pa.array(values)
    part = pa.table(arrays) if arrays else pa.table({"prediction": pa.array([], pa.null())})
    tmp = parts / f"{index:07d}.parquet.tmp"
    pq.write_table(part, tmp)
    os.replace(tmp, parts / f"{index:07d}.parquet")
    errors_path = parts / f"{index:07d}.errors.jsonl"
    if bad:
        tmp = parts / f"{index:07d}.errors.tmp"
        with open(tmp, "w") as fh:
            for row, message in bad:
                record: dict[str, Any] = {"row": row, "error": message}
                if keep:
                    record.update(table.select(keep).slice(row - 1 - first_row, 1).to_pylist()[0])
                fh.write(json.dumps(record, default=str) + "\n")
        os.replace(tmp, errors_path)
    elif errors_path.exists():
        errors_path.unlink()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order (missing ones null) and types."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _assemble(parts: Path, chunks: int, out_format: str, work: Path) -> tuple[Path, Path | None]:
    tables = [pq.read_table(parts / f"{i:07d}.parquet") for i in range(chunks)]
    tables = [t for t in tables if t.num_rows]
    if tables:
        schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
        tables = [t if t.schema == schema else _conform(t, schema) for t in tables]
    output = work / f"output.{out_format}"
    if out_format == "parquet":
        if tables:
            with pq.ParquetWriter(output, schema) as writer:
                for t in tables:
                    writer.write_table(t)
        else:
            pq.write_table(pa.table({"prediction": pa.array([], pa.null())}), output)
    else:
        with pa.OSFile(str(output), "wb") as sink:
            if tables:
                with pacsv.CSVWriter(sink, schema) as writer:
                    for t in tables:
                        writer.write_table(t)
    error_lines = []
    for i in range(chunks):
        path = parts / f"{i:07d}.errors.jsonl"
        if path.exists():
            error_lines.extend(json.loads(line) for line in path.read_text().splitlines())
    if not error_lines:
        return output, None
    errors = work / "errors.csv"
    pacsv.write_csv(pa.Table.from_pylist(error_lines), errors)
    return output, errors
