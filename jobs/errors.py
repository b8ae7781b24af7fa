"""What a job kind's handler raises."""

from __future__ import annotations


class JobFailed(Exception):
    """The job cannot succeed; ``reason`` is what its ``error`` says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JobCancelled(Exception):
    """Raised by a handler (or by the context) once cancel was asked: the job ends cancelled."""


class LeaseLost(JobCancelled):
    """Another worker took the job over (this one was presumed dead): stop without writing."""
