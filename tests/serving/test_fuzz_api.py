"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), against a real
`streamrec serve` with a token and a loaded model: valid and invalid parameters, bodies, headers and
credentials. Every answer must be one the document declares (a documented 503 is fine), never a 500,
and every request must be answered within the timeout: a hang fails the test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
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

from streamrec.param_server.client import ParamClient
from streamrec.serving import schemas
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.serving.conftest import Serving, load_model, serving_factory, start_param_server, write_history

TOKEN = "fuzz-" + uuid.uuid4().hex
REQUEST_TIMEOUT_S = 10.0  # far above any real answer on this tiny model: reaching it means a hang
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Serving]:
    home = tmp_path_factory.mktemp("serving-fuzz")
    param_server = start_param_server(home / "ps")
    prefix = f"test-serving-fuzz-{uuid.uuid4().hex[:10]}"
    start, started = serving_factory(home)
    try:
        rng = np.random.default_rng(11)
        with ParamClient([param_server.address]) as client:
            load_model(client, {f"u{u}": rng.normal(size=4).astype(np.float32) for u in range(5)},
                       {f"i{j}": rng.normal(size=4).astype(np.float32) for j in range(30)})
        store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))
        write_history(store, [("u1", "i3", 1e9), ("u2", "i4", 1e9 + 1)])
        # POST /events produces to a topic of its own on the test broker (fuzzed events stay there)
        topic = f"streamrec.test.fuzz.{uuid.uuid4().hex[:8]}"
        yield start(param_server.address, redis_url, prefix, api_token=TOKEN,
                    extra_env={"STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "STREAMREC_TOPIC": topic})
    finally:
        for serving in started:
            serving.stop()
        param_server.kill()
        FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)).clear()


@pytest.fixture(scope="module")
def api_schema(fuzz_target: Serving) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")


ROUTES = [("GET", "/recommend"), ("POST", "/rescore"), ("GET", "/similar/{item_id}"), ("POST", "/events"),
          ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
          ("GET", "/ui/api/overview"), ("GET", "/ui/api/info"), ("GET", "/ui/api/users"),
          ("GET", "/ui/api/users/{user_id}/history"), ("GET", "/ui/api/history"), ("GET", "/ui/api/items"),
          ("GET", "/ui/api/items/info"), ("GET", "/ui/api/similar")]


WITH_INPUT = {("GET", "/recommend"), ("POST", "/rescore"), ("GET", "/similar/{item_id}"), ("POST", "/events"),
              ("GET", "/ui/api/users"), ("GET", "/ui/api/users/{user_id}/history"), ("GET", "/ui/api/history"),
              ("GET", "/ui/api/items"), ("GET", "/ui/api/items/info"), ("GET", "/ui/api/similar")}  # negative data exists


@pytest.mark.parametrize(("method", "path", "mode"), [
    *((method, path, GenerationMode.POSITIVE) for method, path in ROUTES),
    *((method, path, GenerationMode.NEGATIVE) for method, path in ROUTES if (method, path) in WITH_INPUT),
], ids=str)
def test_api_answers_only_what_it_documents(api_schema: schemathesis.BaseSchema, fuzz_target: Serving, method: str,
                                            path: str, mode: GenerationMode) -> None:
    """Hypothesis drives schemathesis' strategy for one operation directly (its pytest plugin does not
    load under this pytest): bounded examples, no deadline; the request timeout catches a hang."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=fuzz_target.url, headers={"Authorization": f"Bearer {TOKEN}"},
                               checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    fuzz()


def test_the_fuzzed_document_covers_every_route(api_schema: schemathesis.BaseSchema) -> None:
    """The fuzzer only reaches what the document lists: a route missing from it would go unfuzzed."""
    operations = {(op.method.upper(), op.path) for op in (result.ok() for result in api_schema.get_all_operations())}
    assert operations == set(ROUTES)
    assert schemas.Error.model_json_schema()["required"] == ["detail"]  # the shape 401/413/503 bodies are held to
