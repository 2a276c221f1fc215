"""Schemathesis against the served /openapi.json: a bounded number of generated requests per operation
(valid and invalid bodies, odd types, missing fields), and not one 5xx."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from background_server import BackgroundServer  # noqa: E402

KEY = "k-schema"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 40  # per operation: bounded time on a CPU


@pytest.fixture(scope="module")
def api_schema():
    argv = ["serve", "--model", "tiny", "--api-key", KEY, "--max-model-len", "256", "--log-level", "error"]
    with BackgroundServer(argv) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
        schema.base_url = server.url  # set before the server stops (module scope)
        yield schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if case.body is not None and isinstance(case.body, dict):
        # keep generated answers short: the point is the input space, not generation length
        case.body.setdefault("max_tokens", 2)
    response = case.call(headers=AUTH, timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert "error" in response.json()  # OpenAI's error format, always
