"""Small helpers shared by API views."""

from __future__ import annotations

from collections.abc import Mapping

from rest_framework import serializers
from rest_framework.request import Request

from controlplane.lib.errors import ApplicationError
from controlplane.lib.pagination import Pagination


def paginate(request: Request, view, queryset, serializer_class) -> object:
    paginator = Pagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    data = serializer_class(page, many=True, context={"request": request}).data
    return paginator.get_paginated_response(data)


def validated(serializer_class: type[serializers.Serializer], data) -> dict:
    """The input serializer's validated data. A field it does not accept (unknown, or
    read-only such as a model's ``aliases``) is a 400 naming it: silently dropping it
    would answer 200 for a change that was not made."""
    serializer = serializer_class(data=data)
    if isinstance(data, Mapping):
        writable = {name for name, field in serializer.fields.items() if not field.read_only}
        unknown = sorted(str(key) for key in data if key not in writable)
        if unknown:
            raise ApplicationError(
                f"unknown or read-only field(s): {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(writable)) or 'none'}",
                code="unknown_fields",
                details={"fields": unknown},
            )
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class StringMapField(serializers.DictField):
    """A JSON object of string keys and scalar values (tags)."""

    def __init__(self, **kwargs):
        super().__init__(child=serializers.CharField(max_length=5000, allow_blank=True), **kwargs)
