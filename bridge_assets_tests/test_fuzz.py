"""Property-based fuzzing of every endpoint from the service's own OpenAPI schema (schemathesis
generates valid and invalid requests; hypothesis drives them), plus hand-made hostile bodies.
Nothing may answer 5xx, the replica must survive, and every reply must have its record.

`make test` runs a fixed, reproducible set (derandomized). `make fuzz` explores: a random seed
(printed; `BRIDGE_FUZZ_SEED=<seed> make fuzz` replays it) and `BRIDGE_FUZZ_SCALE` times the
examples (default 5) — for a maintainer to run for as long as they like."""

import json
import os
import time
import uuid

import hypothesis
import polars as pl
import requests
import schemathesis
from hypothesis import HealthCheck
from schemathesis.generation.modes import GenerationMode

from bridge_assets.lake.interactions import read_interactions
from bridge_assets_tests.serving_support import REFERENCE_REQUEST, call

# Examples per POST operation and mode (valid and invalid); GETs take no input (one request
# each). At least 5,000 requests in all; batches are the slowest to generate, so fewer of them.
EXAMPLES = {"/predict": 1200, "/predict/batch": 600, "/invocations": 900}
EXPLORE_SEED = os.environ.get("BRIDGE_FUZZ_SEED")  # set (by `make fuzz`): a randomized run from this seed
SCALE = float(os.environ.get("BRIDGE_FUZZ_SCALE") or 1)
seeded = hypothesis.seed(int(EXPLORE_SEED)) if EXPLORE_SEED else (lambda test: test)


def _records(store, request_ids: list[str], timeout: float = 60.0) -> pl.DataFrame:
    deadline = time.monotonic() + timeout
    while True:
        logs = read_interactions(store).filter(pl.col("request_id").is_in(request_ids))
        if logs["request_id"].n_unique() >= len(request_ids) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def test_generated_requests_never_get_a_server_error_and_each_has_its_record(service):
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    session = requests.Session()
    replies: dict[str, tuple[str, int]] = {}  # request id -> (endpoint, status)
    server_errors: list[tuple[str, int, str]] = []
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}

    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:

            @hypothesis.settings(
                max_examples=round(EXAMPLES.get(operation.path, 1) * SCALE), deadline=None, database=None,
                derandomize=EXPLORE_SEED is None, suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate],
            )  # fmt: skip
            @seeded
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def send(case) -> None:
                request_id = uuid.uuid4().hex
                response = case.call(base_url=service.url, session=session, headers={"X-Request-ID": request_id}, timeout=30)
                replies[request_id] = (operation.path, response.status_code)
                if response.status_code >= 500:
                    server_errors.append((operation.path, response.status_code, response.text[:300]))

            started = time.monotonic()
            try:
                send()
            except hypothesis.errors.Unsatisfiable:  # nothing can break this operation's schema
                assert mode == GenerationMode.NEGATIVE, operation.path
            counts[f"{operation.method.upper()} {operation.path} {mode.value}"] = len(replies) - sum(counts.values())
            seconds[f"{operation.path} {mode.value}"] = round(time.monotonic() - started, 1)

    print(f"seed {EXPLORE_SEED or 'fixed (derandomized)'}; generated requests per operation and mode: {counts}; seconds: {seconds}")
    assert len(replies) >= 5_000, counts
    assert server_errors == [], server_errors[:5]
    statuses = {status for _, status in replies.values()}
    assert 200 in statuses and 422 in statuses  # both valid and invalid requests were generated
    assert call(service.url, "/health")[0] == 200 and call(service.url, "/predict", REFERENCE_REQUEST)[0] == 200

    recorded = [rid for rid, (path, _) in replies.items() if path not in ("/health", "/model")]  # GETs: no record
    logs = _records(service.store, recorded)
    by_request = logs.group_by("request_id").agg(pl.col("status").unique(), pl.len().alias("records"))
    seen = {row["request_id"]: row for row in by_request.to_dicts()}
    missing = [rid for rid in recorded if rid not in seen]
    assert missing == [], f"{len(missing)} replies without a record, e.g. {[replies[r] for r in missing[:5]]}"
    for rid in recorded:
        row = seen[rid]
        assert row["status"] == [replies[rid][1]], (rid, replies[rid], row)
        if replies[rid][1] != 200:
            assert row["records"] == 1, (rid, replies[rid], row)  # a rejection is one record


HOSTILE = {
    "oversized": (b'{"records": [' + b",".join([json.dumps(REFERENCE_REQUEST).encode()] * 200_000) + b"]}", "application/json"),
    "deeply nested": (b'{"area": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json"),
    "wrong content type": (json.dumps(REFERENCE_REQUEST).encode(), "text/csv"),
    "not UTF-8": (b'{"mainroad": "\xff\xfe\xfa"}', "application/json"),
    "NaN": (json.dumps({**REFERENCE_REQUEST, "area": float("nan")}).encode(), "application/json"),
    "Infinity": (json.dumps({**REFERENCE_REQUEST, "area": float("inf")}).encode(), "application/json"),
    "huge number": (json.dumps({**REFERENCE_REQUEST, "area": 1e308 * 10}).replace("Infinity", "1" + "0" * 400).encode(), "application/json"),
    "empty": (b"", "application/json"),
}


def test_hostile_bodies_are_refused_with_a_4xx_on_every_endpoint_each_with_its_record(service):
    session = requests.Session()
    sent: dict[str, int] = {}
    for path in ("/predict", "/predict/batch", "/invocations"):
        for name, (body, content_type) in HOSTILE.items():
            request_id = f"hostile-{uuid.uuid4().hex[:8]}"
            reply = session.post(
                f"{service.url}{path}", data=body, timeout=60,
                headers={"Content-Type": content_type, "X-Request-ID": request_id},
            )  # fmt: skip
            assert 400 <= reply.status_code < 500, (path, name, reply.status_code, reply.text[:300])
            assert reply.headers.get("X-Request-ID") == request_id
            sent[request_id] = reply.status_code
    assert call(service.url, "/predict", REFERENCE_REQUEST)[0] == 200  # the replica is alive
    logs = _records(service.store, list(sent))
    by_request = {row["request_id"]: (row["status"], row["records"]) for row in
                  logs.group_by("request_id").agg(pl.col("status").first(), pl.len().alias("records")).to_dicts()}  # fmt: skip
    assert by_request == {rid: (status, 1) for rid, status in sent.items()}  # each refusal: exactly one record, its status
