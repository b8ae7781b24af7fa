"""Schema-driven fuzzing of the whole REST API with schemathesis, against the
running app (a live HTTP server), authenticated: no input may cause a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.security.conftest import aim_at_seeded

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES = 12


def test_no_input_makes_the_api_fail_with_a_server_error(live_server, seeded, session):
    raw = SchemaGenerator().get_schema(request=None, public=True)
    schema = schemathesis.openapi.from_dict(raw)
    headers = {"Authorization": f"Bearer {seeded['token']}"}
    server_errors: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # the whole API, not a corner of it

    def fuzz(operation, mode):
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            if mode == GenerationMode.POSITIVE:
                aim_at_seeded(case, seeded)  # bodies checked by real views and services
            response = case.call(
                base_url=live_server.url, headers=headers, session=session, timeout=60
            )
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                )

        check()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    assert server_errors == []
