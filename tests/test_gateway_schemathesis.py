"""Schemathesis against the gateway's own ``/openapi.json``: generated requests, valid and invalid, over real
HTTP to a ``kmsq gateway`` in front of the real workers. Any 5xx fails, and so does any answer that
contradicts the document: an undocumented status, content type or header, a body that does not match its
schema, schema-invalid input that is accepted, or a 405 without ``Allow``.

``positive_data_acceptance`` is left out on purpose: a schema-valid ``encryptedKey`` that is no ciphertext is
rightly a 400, and a schema-valid ``pub`` that nobody stored a 404.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.gateway_fixtures import Gateway

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]


OPERATIONS = [
    ("POST", "/key"), ("GET", "/key/{pub}"), ("POST", "/generateDataKey"), ("POST", "/decryptDataKey"),
    ("POST", "/key/generate"), ("POST", "/sign"),
]  # fmt: skip


@pytest.fixture(scope="module")
def gateway_schema(gateway: Gateway) -> BaseSchema:
    """The OpenAPI document the running gateway serves."""
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=30)


def test_the_document_lists_the_six_operations(gateway_schema: BaseSchema) -> None:
    operations = [result.ok() for result in gateway_schema.get_all_operations()]  # type: ignore[union-attr]
    listed = {(operation.method.upper(), operation.path) for operation in operations}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_gateway_answers_as_its_openapi_document_says(
    gateway_schema: BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = gateway_schema[path][method]

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case: Case[Any]) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    answers_as_documented()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_boundaries_and_unexpected_methods_answer_as_documented(
    gateway_schema: BaseSchema, method: str, path: str
) -> None:
    """Schemathesis' coverage phase: each length at and past its limit, each missing or mistyped field, and
    methods the path does not allow (which must be 405 with ``Allow``)."""
    operation = gateway_schema[path][method]
    config = gateway_schema.config.generation_for(operation=operation, phase="coverage")
    cases = list(gateway_schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                                    generation_config=config))  # fmt: skip
    assert len(cases) >= 10 and any(case.method.upper() != method for case in cases)
    for case in cases:
        case.call_and_validate(checks=CHECKS, timeout=60)
