"""Small helpers shared by API views."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.request import Request

from controlplane.lib.pagination import Pagination


def paginate(request: Request, view, queryset, serializer_class) -> object:
    paginator = Pagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    data = serializer_class(page, many=True, context={"request": request}).data
    return paginator.get_paginated_response(data)


def validated(serializer_class: type[serializers.Serializer], data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class StringMapField(serializers.DictField):
    """A JSON object of string keys and scalar values (tags)."""

    def __init__(self, **kwargs):
        super().__init__(child=serializers.CharField(max_length=5000, allow_blank=True), **kwargs)
