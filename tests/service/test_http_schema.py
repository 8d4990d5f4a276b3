"""Property-based run of the HTTP API against its own OpenAPI schema (schemathesis).

One real node serves on a loopback port (uvicorn, SQLite job store, real DICOM listener);
schemathesis reads ``/openapi.json`` from it over HTTP and sends requests generated from
the schema to every operation: random ids, filters, pages. Every answer must be documented
(status, content type, body schema) and none may be a server error. Bounded to a few dozen
examples per operation so the module stays well under a minute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import negative_data_rejection
from schemathesis.specs.openapi.schemas import OpenApiSchema

from service.http import openapi_schema
from service.node import Node
from tests.conftest import free_port, ignores_pynetdicom_socket_leak
from tests.service.store.test_repository import queued_job
from tests.service.test_http import AUTH, TOKEN, StagedProcessor, node_settings, wait_readiness

pytestmark = [pytest.mark.network, ignores_pynetdicom_socket_leak]

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node with a token and a few jobs (queued, failed, done) to find."""
    tmp_path: Path = tmp_path_factory.mktemp("schema-node")
    # The destination is a closed port: retried jobs fail at send, which is fine here.
    node = Node(
        node_settings(tmp_path, free_port(), max_attempts=1, token=TOKEN),
        StagedProcessor(),
        lambda: (True, "test double"),
    )
    with node:
        wait_readiness(f"http://127.0.0.1:{node.http_port}", ready=True)
        store = node.store
        for _ in range(3):
            queued_job(store)
        yield node


@pytest.fixture(scope="module")
def api_schema(running_node: Node) -> OpenApiSchema:
    """The schema as the node serves it."""
    base = f"http://127.0.0.1:{running_node.http_port}"
    return schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH, timeout=10)


# schemathesis' own pytest integration (``schema.parametrize`` on a lazy fixture) sets
# ``Function._nodeid``, which pytest 9 no longer has; each operation's hypothesis strategy
# is driven directly instead, one pytest case per operation.
# Negative cases need something to break: parameters, or the token.
OPERATIONS = [
    pytest.param(path, method.upper(), mode, id=f"{mode} {method.upper()} {path}")
    for path, ops in openapi_schema()["paths"].items()
    for method, op in ops.items()
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or "parameters" in op or "security" in op
]


@pytest.mark.parametrize(("path", "method", "mode"), OPERATIONS)
def test_api_conforms_to_its_schema_and_never_fails(
    path: str, method: str, mode: GenerationMode, api_schema: OpenApiSchema, running_node: Node
) -> None:
    """Positive: valid requests get documented answers. Negative: requests that break
    the schema (bad types, out-of-range pages, malformed times) get a 4xx, never a 5xx."""
    base = f"http://127.0.0.1:{running_node.http_port}"
    operation = api_schema[path][method]
    statuses: Counter[int] = Counter()
    # Unknown query parameters are ignored by design (as most HTTP APIs do), and the
    # token is always sent here, so "schema-violating request accepted" is not a defect;
    # every other check (no 5xx, documented status, content type and body) still runs.
    excluded = [negative_data_rejection] if mode is GenerationMode.NEGATIVE else []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case: Case) -> None:
        response = case.call_and_validate(
            base_url=base, headers=AUTH, timeout=10, excluded_checks=excluded
        )
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text

    call()
    print(f"{mode} {method} {path}: {sum(statuses.values())} requests, {dict(statuses)}")
