"""The OpenAPI schema the app serves matches what it answers. schemathesis reads
the live schema (GET /api/schema/) from a running server and sends generated calls
(valid and invalid) with a full-scope token; every response must be declared: its
status code, its content type and its body's schema. Unsupported methods get 405."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security.conftest import KNOWN, aim_at_seeded

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 3}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _live_schema(live_server, headers):
    return schemathesis.openapi.from_url(
        f"{live_server.url}/api/schema/?format=json", headers=headers, timeout=30
    )


def test_every_answer_matches_the_served_schema(live_server, seeded, session):
    headers = {"Authorization": f"Bearer {seeded['token']}"}
    schema = _live_schema(live_server, headers)
    mismatches: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30  # the whole API, not a corner of it
    calls = 0

    def run(operation, mode):
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            nonlocal calls
            if mode == GenerationMode.POSITIVE:
                aim_at_seeded(case, seeded)  # bodies checked by real views and services
            response = case.call(
                base_url=live_server.url, headers=headers, session=session, timeout=60
            )
            calls += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect them all
                first = str(exc).strip().splitlines()[:6]
                mismatches.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    + " | ".join(first)
                )

        check()

    for operation in operations:
        for mode in EXAMPLES:
            run(operation, mode)
    print(f"schemathesis: {calls} calls over {len(operations)} operations")
    assert calls >= 150
    assert mismatches == [], "\n".join(mismatches[:40])


def test_unsupported_methods_answer_405_with_the_error_shape(live_server, seeded, session):
    headers = {"Authorization": f"Bearer {seeded['token']}"}
    raw = session.get(f"{live_server.url}/api/schema/?format=json", headers=headers).json()
    params = {**{k: str(v) for k, v in KNOWN.items()}, "name": seeded["model"]}
    checked = 0
    for path, item in raw["paths"].items():
        declared = {m.upper() for m in item if m != "parameters"}
        url = live_server.url + path.format(**params)
        if path.startswith("/api/v1/deployments/{name}"):
            url = live_server.url + path.format(**{**params, "name": seeded["deployment"]})
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - declared:
            resp = session.request(method, url, headers=headers)
            assert resp.status_code == 405, (method, path, resp.status_code, resp.text[:200])
            assert resp.headers["Content-Type"].startswith("application/json")
            error = resp.json()["error"]
            assert error["code"] == "method_not_allowed" and error["message"]
            assert method not in resp.headers["Allow"]
            checked += 1
    assert checked >= 50
