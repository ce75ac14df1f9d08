"""Property-based fuzzing of every HTTP route from the server's own OpenAPI schema (schemathesis).

Each operation gets schema-valid (positive) and schema-violating (negative) requests, bounded in
examples, against a live server over the fake generator. Every response must: not be a 5xx,
carry a documented status code and content type, match its documented schema, and leak no trace
or path. ``positive_data_acceptance`` is left out on purpose: whether a schema-valid request is
accepted depends on the served model's bounds and the server's limits (size range and multiple,
steps, max_n, prompt length), which a static schema cannot state - those give a documented 400.
"""

from __future__ import annotations

import os
from collections import Counter

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from server.testing.fakes import FakeGenerator  # noqa: E402
from tests.reliability.helpers import assert_no_leak, live  # noqa: E402

# T2I_FUZZ_EXAMPLES raises the bound for a longer run (RELIABILITY.md gives the command).
EXAMPLES = int(os.environ.get("T2I_FUZZ_EXAMPLES", "40"))
EXCLUDED = [positive_data_acceptance]


def fuzz_operations(server, examples: int, headers: dict | None = None) -> tuple[Counter, list[str]]:
    """Run every operation of the served schema in both modes; (status counts, failures)."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    statuses: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def check(case):
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                statuses[(operation.label, response.status_code)] += 1
                try:
                    case.validate_response(response, excluded_checks=EXCLUDED, headers=headers)
                    assert_no_leak(response.text, operation.label)
                except (AssertionError, BaseExceptionGroup, Exception) as exc:  # collect, do not stop
                    failures.append(f"{operation.label} [{mode.value}] {response.status_code}: {str(exc)[:400]}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass  # no parameters to violate: there is no negative case for this operation
    return statuses, failures


def test_every_route_conforms_to_its_schema_under_fuzzing(tmp_path):
    with live(tmp_path, generator=FakeGenerator()) as server:
        statuses, failures = fuzz_operations(server, EXAMPLES)
        health = server.engine.accepting
    total = sum(statuses.values())
    by_code = Counter()
    for (_, code), count in statuses.items():
        by_code[code] += count
    print(f"\nschemathesis: {total} requests over {len({op for op, _ in statuses})} operations; "
          f"by status: {dict(sorted(by_code.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert not [code for code in by_code if code >= 500]
    assert health
    # The fuzzer reached the interesting outcomes, not only 400s.
    assert statuses[("POST /v1/images/generations", 200)] > 0
    assert statuses[("POST /v1/images/generations", 400)] > 0
    assert statuses[("GET /api/image/{filename}", 404)] > 0


def test_fuzzing_with_api_keys_on_gets_documented_401s(tmp_path):
    with live(tmp_path, generator=FakeGenerator(), api_keys=["fuzz-key"]) as server:
        anonymous, failures = fuzz_operations(server, max(5, EXAMPLES // 4))
        keyed, keyed_failures = fuzz_operations(server, max(5, EXAMPLES // 4),
                                                headers={"Authorization": "Bearer fuzz-key"})
    assert not failures + keyed_failures, "\n".join((failures + keyed_failures)[:10])
    v1_codes = {code for (op, code) in anonymous if " /v1/" in op}
    # No key: refused. Only a body that is not JSON at all is a 400 first (FastAPI parses the
    # body before it runs dependencies), and a generated model id that makes the path match no
    # route (e.g. an empty one) is the router's 404; no job, model or image data is reachable.
    assert 401 in v1_codes and v1_codes <= {400, 401, 404}, v1_codes
    assert {code for (op, code) in keyed if " /v1/" in op} - {401}  # with the key they get through
