"""Job kinds by name: the one interface between the jobs framework and the work it runs.

A kind is a handler ``run(ctx: JobContext) -> dict``. The framework (jobs/services.py) calls
it in a Celery worker with the job's lease held; what it returns becomes the job's
``result``. The contract, agreed with the conversion engine (``registry/conversion``)::

    class JobContext:            # jobs/context.py
        job_id: int
        kind: str
        input: dict              # the job's input JSON as submitted (validated)
        owner                    # the user who submitted it
        workdir: Path            # private dir for this job, kept across resume, removed when the job is gone
        state: dict              # the last checkpoint (empty on first run)
        def progress(self, done: int, total: int | None = None) -> None
        def log(self, message: str) -> None
        def checkpoint(self, state: dict) -> None      # persisted atomically
        def cancelled(self) -> bool
        def commit(self) -> None    # the point of no return; raises JobCancelled if too late
        def set_output(self, path: Path, *, filename: str, content_type: str) -> None
    handler(ctx) -> dict   # the job's `result`; raising JobFailed(reason) (jobs.errors) fails it with that reason

    KINDS = {"batch": jobs.batch.run, "convert": registry.conversion.run}

A handler that sees ``ctx.cancelled()`` should stop soon and return (or raise
``jobs.errors.JobCancelled``): the job ends ``cancelled`` either way. A handler with a step
that cannot be undone (registering a version) calls ``ctx.commit()`` right before it: either
a cancel was asked first (``JobCancelled`` is raised, the step is not done) or the job is
committed, and cancelling it is refused (409 ``job_committed``) until it ends. A worker killed
mid-job is replaced by another that calls the handler again with ``ctx.state`` = the last
checkpoint and the same ``workdir``: a handler makes every step after a checkpoint
repeatable. Any other exception fails the job with its type and message (a bug, logged).

``convert`` is imported lazily: while ``registry.conversion`` is absent (or cannot be
imported), a convert job is still accepted (202) and then fails at once with a clear error
("job kind 'convert' is not available in this installation (registry.conversion cannot be
imported ...)"), never a 5xx.

Beyond the contract, ``ctx.attach(name, path, filename=, content_type=)`` keeps more files
than the output (batch: ``errors``); all are served at ``/api/v1/jobs/{id}/files/{name}``
once the job has succeeded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import JobFailed

Handler = Callable[[Any], dict]

# kind -> "module:function", imported when first used.
KINDS: dict[str, str] = {
    "batch": "jobs.batch:run",
    "convert": "registry.conversion:run",
}


class KindUnavailable(Exception):
    """The kind is unknown, or its module cannot be imported here."""


def handler_for(kind: str) -> Handler:
    target = KINDS.get(kind)
    if target is None:
        raise KindUnavailable(f"unknown job kind {kind!r}; kinds: {', '.join(sorted(KINDS))}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise KindUnavailable(
            f"job kind {kind!r} is not available in this installation "
            f"({module_name} cannot be imported: no module {missing!r})"
        ) from None
    handler = getattr(module, attr, None)
    if handler is None:
        raise KindUnavailable(f"job kind {kind!r}: {module_name} has no {attr}()")
    return handler


def check_available(kind: str) -> None:
    """Raise KindUnavailable unless ``kind`` can run here."""
    handler_for(kind)


__all__ = ["KINDS", "Handler", "JobFailed", "KindUnavailable", "handler_for", "check_available"]
