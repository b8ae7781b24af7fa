"""Serve plotly.js from the installed plotly package as the static file
``monitoring/plotly.min.js``: no CDN, no copy of a 4.8 MB file in the repository, and
``collectstatic`` picks it up like any other static file."""

from __future__ import annotations

from pathlib import Path

import plotly
from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PLOTLY_JS = "monitoring/plotly.min.js"
PLOTLY_VERSION = plotly.__version__


def _package_data() -> Path:
    return Path(plotly.__file__).resolve().parent / "package_data"


class PlotlyFinder(BaseFinder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.storage = FileSystemStorage(location=str(_package_data()))
        self.storage.prefix = "monitoring"

    def check(self, **kwargs) -> list:
        from django.core.checks import Error

        if not (_package_data() / "plotly.min.js").exists():
            return [
                Error(
                    "plotly's package_data/plotly.min.js is missing; reinstall plotly",
                    id="monitoring.E001",
                )
            ]
        return []

    def find(self, path: str, find_all: bool = False, **kwargs):
        if path != PLOTLY_JS:
            return [] if find_all else None
        match = str(_package_data() / "plotly.min.js")
        return [match] if find_all else match

    def list(self, ignore_patterns):
        yield "plotly.min.js", self.storage
