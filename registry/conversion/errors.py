"""How a conversion job fails.

ConversionFailed fails the job (its message is the job's error); ConversionCancelled ends it
cancelled. Where the jobs framework is installed (jobs.errors), they are also its JobFailed
and JobCancelled, so the framework maps them with nothing to wire; without it (this module
alone, its tests) they are plain exceptions."""

from __future__ import annotations

try:  # the jobs framework, where installed
    from jobs.errors import JobCancelled as _Cancelled
    from jobs.errors import JobFailed as _Failed
except ImportError:  # pragma: no cover - depends on the installation

    class _Failed(Exception):
        def __init__(self, reason: str) -> None:
            super().__init__(reason)
            self.reason = reason

    class _Cancelled(Exception):
        pass


class ConversionFailed(_Failed):
    """The conversion cannot be done, or its result did not pass verification; the message
    says why (the converter's own reason, or the verification figures against the tolerances).
    Nothing is registered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConversionCancelled(_Cancelled, ConversionFailed):
    """The job was cancelled while converting; the subprocess was stopped. A JobCancelled
    first (the framework checks that before JobFailed), and a ConversionFailed."""
