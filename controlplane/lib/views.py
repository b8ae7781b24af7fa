"""Helpers shared by the apps' UI views."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from .errors import ApplicationError

View = Callable[..., HttpResponse]


def error_pages(template: str) -> Callable[[View], View]:
    """A decorator: a domain error a UI view raises while reading (an unknown name, a bad
    number...) becomes ``template`` rendered with it, under the error's status code."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                return view(request, *args, **kwargs)
            except ApplicationError as exc:
                return render(request, template, {"error": exc}, status=exc.status_code)

        return wrapper

    return decorate
