"""A JobContext for the tests: the interface the jobs framework gives a job kind's handler,
with the job's record kept in memory (logs, progress, checkpoints) and a temporary workdir."""

from __future__ import annotations

import itertools
from pathlib import Path

_ids = itertools.count(1)


class FakeJobContext:
    """What registry.conversion.run sees of a job: input, owner, workdir, state; progress,
    log, checkpoint, cancelled, commit, set_output."""

    def __init__(self, *, input: dict, owner, workdir: Path, kind: str = "convert") -> None:
        self.job_id = 900_000 + next(_ids)
        self.attempt = 1
        self.kind = kind
        self.input = input
        self.owner = owner
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state: dict = {}
        self.logs: list[str] = []
        self.progress_calls: list[tuple[int, int | None]] = []
        self.checkpoints: list[dict] = []
        self.outputs: list[tuple[Path, str, str]] = []
        self.cancel_requested = False
        self.committed = False

    def progress(self, done: int, total: int | None = None) -> None:
        self.progress_calls.append((done, total))

    def log(self, message: str) -> None:
        self.logs.append(message)

    def checkpoint(self, state: dict) -> None:
        self.state = dict(state)
        self.checkpoints.append(dict(state))

    def cancelled(self) -> bool:
        return self.cancel_requested and not self.committed

    def commit(self) -> None:
        from registry.conversion.errors import ConversionCancelled

        if self.cancel_requested and not self.committed:
            raise ConversionCancelled("cancelled before the commit point")
        self.committed = True

    def process_labels(self) -> dict[str, str]:
        return {"CONTROLPLANE_TEST_JOB": str(self.job_id)}

    def set_output(self, path: Path, *, filename: str, content_type: str) -> None:
        self.outputs.append((Path(path), filename, content_type))
