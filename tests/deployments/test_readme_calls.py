"""The README's requests and the deployment page's "Call it" box, run as a user would
(bash and curl) against a real deployment of the model the README's snippet builds."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from deployments import services
from tests.conftest import zip_dir
from tests.deployments.conftest import converge

pytestmark = [pytest.mark.django_db, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_blocks() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("**Calling a deployment.**") :]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    calls = section[section.index("<!-- call-examples") :]
    shell = re.search(r"```sh\n(.*?)```", calls, re.S).group(1)
    return python, shell


def _run(command: str, endpoint: str) -> dict:
    out = subprocess.run(
        ["bash", "-c", command],
        env={**os.environ, "E": endpoint},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_readme_requests_and_the_call_it_box_work(
    tmp_path, monkeypatch, api, user, model_name, client_logged_in
):
    python, shell = _readme_blocks()
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "README.md", "exec"), {})  # the snippet, as written
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{model_name}/versions", zip_dir(tmp_path / "churn_model"))
    assert resp.status_code == 201, resp.content
    services.deployment_create(
        name="readme", model_name=model_name, version="1", runtime="local", actor=user
    )
    d = converge("readme")

    # The README: three protocols, {name} the model's name.
    commands = ["curl " + c for c in shell.replace("churn", model_name).split("\ncurl ")[1:]]
    assert len(commands) == 3
    invocations, v1, v2 = (_run(c, d.endpoint) for c in commands)
    assert invocations == {"predictions": [1]} and v1 == {"predictions": [1]}
    assert v2["model_name"] == model_name and v2["outputs"][0]["data"] == [1]

    # The page's "Call it" box: one command per protocol, each answering for the 2 example rows.
    page = html.unescape(client_logged_in.get("/deployments/readme/").content.decode())
    boxes = dict(re.findall(r'<textarea id="(curl-[\w-]+)"[^>]*>(.*?)</textarea>', page, re.S))
    assert set(boxes) == {"curl-example", "curl-v1", "curl-v2"}
    assert f"/v1/models/{model_name}:predict" in boxes["curl-v1"]
    assert f"/v2/models/{model_name}/infer" in boxes["curl-v2"]
    assert len(_run(boxes["curl-example"], d.endpoint)["predictions"]) == 2
    assert len(_run(boxes["curl-v1"], d.endpoint)["predictions"]) == 2
    assert _run(boxes["curl-v2"], d.endpoint)["outputs"][0]["shape"][0] == 2
    assert "serving/README.md" in page and "<code>{name}</code> is the model" in page
