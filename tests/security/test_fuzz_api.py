"""Schema-driven fuzzing of the whole REST API with schemathesis, against the
running app (a live HTTP server), authenticated: no input may cause a 5xx."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES = 12


@pytest.fixture
def seeded(django_user_model, token_for, model_zip, model_name):
    """A superuser's full-scope token, and a model with a version, so fuzzed
    calls reach deep into the views, not just their 404s."""
    from registry.services import model_version_register

    admin = django_user_model.objects.create_superuser("fuzzer", password="pw-fuzzer-123")
    import io

    model_version_register(
        model_name=model_name, archive=io.BytesIO(model_zip), actor=admin, create_model=True
    )
    from deployments.services import deployment_create

    deployment_create(
        name="fuzz-dep", model_name=model_name, version="1", runtime="local", actor=admin
    )
    return {"token": token_for(admin), "model": model_name, "deployment": "fuzz-dep"}


def test_no_input_makes_the_api_fail_with_a_server_error(live_server, seeded):
    raw = SchemaGenerator().get_schema(request=None, public=True)
    schema = schemathesis.openapi.from_dict(raw)
    headers = {"Authorization": f"Bearer {seeded['token']}"}
    known = {"version": "1", "alias": "staging", "request_id": 1, "rule_id": 1}
    session = requests.Session()
    session.trust_env = False
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
            if mode == GenerationMode.POSITIVE and case.path_parameters:
                # Aim at objects that exist, so bodies are checked by real views and services.
                for key in case.path_parameters:
                    if key == "name":
                        is_deployment = case.path.startswith("/api/v1/deployments")
                        case.path_parameters[key] = seeded[
                            "deployment" if is_deployment else "model"
                        ]
                    elif key in known:
                        case.path_parameters[key] = known[key]
            response = case.call(
                base_url=live_server.url, headers=headers, session=session, timeout=60
            )
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                )

        check()

    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode)
    finally:
        # A kept-alive connection keeps its server thread, and that thread's database
        # connection, alive past the suite: the test database could not be dropped.
        session.close()
    assert server_errors == []
