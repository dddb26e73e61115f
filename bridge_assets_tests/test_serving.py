"""The prediction service over real HTTP against the session's real Ray Serve (`service` fixture).

Versions are trained and registered in a real MLflow store, marked Production, and deployed by
materializing `production_deployment`; interaction logs are read back from the lake (local,
and moto's S3 over HTTP).
"""

import http.client
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from ray import serve

from bridge_assets.cli import main as cli_main
from bridge_assets.core.contract import validate
from bridge_assets.lake.feedback import withheld_key
from bridge_assets.lake.interactions import read_interactions
from bridge_assets.lake.settings import StorageSettings
from bridge_assets.ml.registry import promote_to_production
from bridge_assets.ml.tracking import log_pyfunc
from bridge_assets.ml.traffic import send_traffic
from bridge_assets_tests.conftest import s3_environment
from bridge_assets_tests.serving_support import (
    MAX_BATCH,
    MAX_BODY,
    REFERENCE_REQUEST,
    call,
    continuous_load,
    deploy_through_dagster,
)
from serving.cluster import stop_serving
from serving.cluster_settings import ClusterSettings
from serving.deploy import ServingSettings, api_key_status, deploy, service_state
from serving.processes import free_port
from serving.router import assign


def test_deployment_metadata_names_the_version_and_probe(service):
    assert service.metadata["model_version"] == service.versions[0]
    assert service.metadata["probe_rows"] == 545 and service.metadata["probe_latency_ms"] > 0


def test_reference_payload_and_health_reply_as_the_reference(service):
    status, body, headers = call(service.url, "/predict", REFERENCE_REQUEST, {"X-Request-ID": "req-1"})
    assert status == 200 and headers.get_all("X-Request-ID") == ["req-1"]  # once, not twice
    assert body["status"] == 200 and body["message"] == "House price prediction successful"
    response = body["response"]
    assert response["unit"] == "GBP(£)" and response["prediction"] > 0
    assert (response["model_name"], response["model_version"]) == ("housing-price", service.versions[0])
    assert call(service.url, "/health")[:2] == (200, {"status": 200, "message": "success", "response": None})
    first, second = (call(service.url, "/predict", REFERENCE_REQUEST)[2].get_all("X-Request-ID") for _ in range(2))
    assert len(first) == len(second) == 1 and first != second  # generated when not sent
    for path, body in (("/predict/batch", {"records": [REFERENCE_REQUEST]}), ("/invocations", {"inputs": [REFERENCE_REQUEST]})):
        assert call(service.url, path, body, {"X-Request-ID": "req-2"})[2].get_all("X-Request-ID") == ["req-2"], path
    assert call(service.url, "/predict", {}, {"X-Request-ID": "req-3"})[2].get_all("X-Request-ID") == ["req-3"]


def test_yes_no_and_furnishing_in_any_case(service):
    _, canonical, _ = call(service.url, "/predict", REFERENCE_REQUEST)
    odd = {**REFERENCE_REQUEST, "mainroad": "YES", "guestroom": " No ", "basement": "Yes", "furnishingstatus": "FURNISHED "}
    status, body, _ = call(service.url, "/predict", odd)
    assert status == 200 and body["response"]["prediction"] == canonical["response"]["prediction"]


@pytest.mark.parametrize(
    ("field", "value"), [("bedrooms", 10), ("stories", 5), ("mainroad", "Y"), ("furnishingstatus", "partly"), ("area", 100_001)]
)
def test_invalid_fields_are_422_naming_the_field(service, field, value):
    status, body, _ = call(service.url, "/predict", {**REFERENCE_REQUEST, field: value})
    assert status == 422
    assert [d["loc"] for d in body["detail"]] == [["body", field]] and field in body["message"]


def test_non_finite_numbers_are_422_not_a_server_error(service):
    raw = json.dumps({**REFERENCE_REQUEST, "bedrooms": float("nan"), "area": float("inf")}).encode()
    status, body, _ = call(service.url, "/predict", raw=raw)
    assert status == 422 and {d["loc"][1] for d in body["detail"]} == {"bedrooms", "area"}


def _post_without_content_type(url: str, path: str, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    connection.request("POST", path, body, {})
    reply = connection.getresponse()
    answer = reply.status, json.load(reply)
    connection.close()
    return answer


def test_missing_field_broken_json_and_content_type_say_what_is_wrong(service):
    status, body, _ = call(service.url, "/predict", {k: v for k, v in REFERENCE_REQUEST.items() if k != "area"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "area"] and body["message"] == "invalid input: area"
    status, body, _ = call(service.url, "/predict", raw=b"{not json")
    assert status == 422 and body["message"].startswith("body is not valid JSON: Expecting property name")
    status, body, _ = call(service.url, "/invocations", raw=b"{not json")
    assert status == 400 and body["error_code"] == "BAD_REQUEST" and body["message"].startswith("body is not valid JSON")
    status, body = _post_without_content_type(service.url, "/predict", json.dumps(REFERENCE_REQUEST).encode())
    assert (status, body["message"]) == (415, "Content-Type must be application/json (none sent)")
    status, body, _ = call(service.url, "/invocations", {"inputs": [REFERENCE_REQUEST]}, {"Content-Type": "text/csv"})
    assert status == 415 and body == {"error_code": "BAD_REQUEST", "message": "Content-Type must be application/json (got 'text/csv')"}


def test_default_limits_agree_a_full_batch_of_the_widest_houses_fits_the_body_limit():
    widest = {**{f: " Yes " for f in ("mainroad", "guestroom", "basement", "hotwaterheating", "airconditioning", "prefarea")},
              "furnishingstatus": "semi-furnished", "area": 12345.678901234567, "bedrooms": 6, "bathrooms": 4,
              "stories": 4, "parking": 3}  # fmt: skip
    defaults = ServingSettings.from_env({})
    full_batch = {"records": [widest] * defaults.max_batch_records}
    assert defaults.max_batch_records == 10_000
    assert len(json.dumps(full_batch, indent=2).encode()) <= defaults.max_body_bytes


def test_bodies_over_the_limit_are_413_naming_both_limits_in_the_endpoints_shape(service):
    both_limits = f"larger than {MAX_BODY} bytes (BRIDGE_SERVE_MAX_BODY); a batch holds at most {MAX_BATCH} records"
    status, body, _ = call(service.url, "/predict", raw=b" " * (MAX_BODY + 10))
    assert status == 413 and both_limits in body["message"] and body["response"] is None
    status, body, _ = call(service.url, "/invocations", raw=b" " * (MAX_BODY + 10))
    assert status == 413 and body["error_code"] == "REQUEST_LIMIT_EXCEEDED" and both_limits in body["message"]
    assert set(body) == {"error_code", "message"}
    port = int(service.url.rsplit(":", 1)[1])
    for path in ("/predict", "/invocations"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # streamed, no Content-Length
        chunks = (b" " * 65_536 for _ in range(MAX_BODY // 65_536 + 2))
        connection.request("POST", path, chunks, {"Content-Type": "application/json"}, encode_chunked=True)
        reply = connection.getresponse()
        body = json.load(reply)
        assert reply.status == 413 and both_limits in body["message"], (path, body)
        assert ("error_code" in body) == (path == "/invocations")
        connection.close()


def test_batch_endpoint_matches_single_predictions_and_enforces_its_limit(service):
    records = [REFERENCE_REQUEST, {**REFERENCE_REQUEST, "area": 5000, "stories": 3}]
    status, body, _ = call(service.url, "/predict/batch", {"records": records})
    singles = [call(service.url, "/predict", r)[1]["response"]["prediction"] for r in records]
    assert status == 200 and body["response"]["predictions"] == pytest.approx(singles, rel=1e-12)
    status, body, _ = call(service.url, "/predict/batch", {"records": [REFERENCE_REQUEST] * (MAX_BATCH + 1)})
    assert status == 413 and f"at most {MAX_BATCH} per request" in body["message"] and f"{MAX_BODY} bytes" in body["message"]
    status, body, _ = call(service.url, "/predict/batch", {"records": [REFERENCE_REQUEST, {**REFERENCE_REQUEST, "bedrooms": 12}]})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "records", 1, "bedrooms"]


def test_all_four_mlflow_scoring_shapes(service):
    records = [REFERENCE_REQUEST, {**REFERENCE_REQUEST, "area": 7420, "bedrooms": 4}]
    columns = list(REFERENCE_REQUEST)
    shapes = {
        "dataframe_split": {"columns": columns, "data": [[r[c] for c in columns] for r in records]},
        "dataframe_records": records,
        "instances": records,
        "inputs": {c: [r[c] for r in records] for c in columns},
    }
    expected = call(service.url, "/predict/batch", {"records": records})[1]["response"]["predictions"]
    for key, data in shapes.items():
        status, body, _ = call(service.url, "/invocations", {key: data})
        assert status == 200 and body["predictions"] == pytest.approx(expected, rel=1e-12), key
    status, body, _ = call(service.url, "/invocations", {"dataframe_records": records, "inputs": {}})
    assert status == 400 and body["error_code"] == "BAD_REQUEST" and "exactly one" in body["message"]
    status, body, _ = call(service.url, "/invocations", {"dataframe_records": [REFERENCE_REQUEST, {**REFERENCE_REQUEST, "stories": 5}]})
    assert status == 422 and body["error_code"] == "INVALID_PARAMETER_VALUE" and body["message"].startswith("invalid input: row 1: stories")
    for odd in ({"area": "abc"}, {"bedrooms": [1, 2]}):
        status, body, _ = call(service.url, "/invocations", {"dataframe_records": [{**REFERENCE_REQUEST, **odd}]})
        assert status == 422 and body["error_code"] == "INVALID_PARAMETER_VALUE", (odd, status, body)
    short = {"columns": columns, "data": [[REFERENCE_REQUEST[c] for c in columns], [REFERENCE_REQUEST[c] for c in columns[:-1]]]}
    status, body, _ = call(service.url, "/invocations", {"dataframe_split": short})
    assert (status, body) == (400, {"error_code": "BAD_REQUEST", "message": "dataframe_split: row 1 has 11 values for 12 columns"})
    status, body, _ = call(service.url, "/invocations", {"dataframe_records": [{k: v for k, v in REFERENCE_REQUEST.items() if k != "area"}]})
    assert status == 422 and body["error_code"] == "INVALID_PARAMETER_VALUE" and body["message"] == "invalid input: row 0: area (Field required)"


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [("bedrooms", True, "not a boolean"), ("area", "1200", "not a string"), ("parking", "1", "not a string"),
     ("pool", 1, "Extra inputs are not permitted")],
)  # fmt: skip
def test_strict_types_and_unknown_fields_are_422_naming_the_field_on_every_endpoint(service, field, value, why):
    """A boolean is not a count, a string is not a number, an unknown field is refused by name."""
    house = {**REFERENCE_REQUEST, field: value}
    status, body, _ = call(service.url, "/predict", house)
    assert status == 422 and body["message"] == f"invalid input: {field}" and why in body["detail"][0]["msg"], body
    status, body, _ = call(service.url, "/predict/batch", {"records": [REFERENCE_REQUEST, house]})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "records", 1, field], body
    status, body, _ = call(service.url, "/invocations", {"dataframe_records": [house]})
    assert status == 422 and body["message"].startswith(f"invalid input: row 0: {field} (") and why in body["message"], body
    assert call(service.url, "/predict", {**REFERENCE_REQUEST, "bedrooms": 3.0})[0] == 200  # an integral number is a count


def test_unknown_paths_and_wrong_methods_answer_in_the_services_shape(service):
    status, body, _ = call(service.url, "/nonexistent")
    assert (status, body) == (404, {"status": 404, "message": "no endpoint /nonexistent: see /docs for the API", "response": None})
    status, body, headers = call(service.url, "/predict")
    assert status == 405 and body["message"] == "GET is not allowed on /predict: use POST" and headers["Allow"] == "POST"
    status, body, _ = call(service.url, "/health", {})
    assert status == 405 and body["message"] == "POST is not allowed on /health: use GET" and body["response"] is None
    status, body, _ = call(service.url, "/invocations")
    assert status == 405 and body == {"error_code": "BAD_REQUEST", "message": "GET is not allowed on /invocations: use POST"}


def test_parity_training_contract_pyfunc_and_http(service):
    raw = {**REFERENCE_REQUEST, "mainroad": " Yes", "airconditioning": "NO"}
    model = service.rounds[0].best.model
    through_training = model.predict(validate(pl.DataFrame([raw]).with_columns(pl.lit("r").alias("row_id")), require_target=False).valid)[0]
    pyfunc = mlflow.pyfunc.load_model(f"models:/housing-price/{service.versions[0]}").predict(pd.DataFrame([raw]))[0]
    over_http = call(service.url, "/predict", raw)[1]["response"]["prediction"]
    assert pyfunc == pytest.approx(through_training, rel=1e-6)
    assert over_http == pytest.approx(pyfunc, rel=1e-6)


def _logged(store, request_ids: set[str], expected: int, timeout: float = 60.0) -> pl.DataFrame:
    deadline = time.monotonic() + timeout
    while True:
        logs = read_interactions(store).filter(pl.col("request_id").is_in(list(request_ids)))
        if logs.height >= expected or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def _traffic(url: str, tag: str, headers: dict | None = None) -> tuple[set[str], int]:
    """Known traffic: 5 predictions, 2 rejections, a batch of 3, invocations of 4 rows."""
    ids = [f"{tag}-{i}" for i in range(9)]
    sent = [{"X-Request-ID": request_id, **(headers or {})} for request_id in ids]
    for i in range(5):
        assert call(url, "/predict", {**REFERENCE_REQUEST, "area": 1000 + i}, sent[i])[0] == 200
    assert call(url, "/predict", {**REFERENCE_REQUEST, "bedrooms": 10}, sent[5])[0] == 422
    assert call(url, "/predict", raw=b" " * (MAX_BODY + 1), headers=sent[6])[0] == 413
    assert call(url, "/predict/batch", {"records": [REFERENCE_REQUEST] * 3}, sent[7])[0] == 200
    assert call(url, "/invocations", {"dataframe_records": [REFERENCE_REQUEST] * 4}, sent[8])[0] == 200
    return set(ids), 5 + 2 + 3 + 4


def test_interaction_records_equal_what_was_sent(service):
    ids, expected = _traffic(service.url, f"local-{uuid.uuid4().hex[:6]}")
    logs = _logged(service.store, ids, expected)
    assert logs.height == expected
    by_status = dict(logs.group_by("status").len().iter_rows())
    assert by_status == {200: 12, 422: 1, 413: 1}
    assert logs.filter(pl.col("status") != 200)["prediction"].null_count() == 2
    batch = logs.filter(pl.col("endpoint") == "/predict/batch").sort("row_index")
    assert batch["row_index"].to_list() == [0, 1, 2] and batch["request_id"].n_unique() == 1
    ok = logs.filter(pl.col("status") == 200)
    assert set(ok["model_version"]) == {service.versions[0]} and ok["area"].null_count() == 0
    keys = [k for k in service.store.list("interactions/") if k.endswith(".parquet")]
    assert keys and all("/date=" in k and "/hour=" in k for k in keys)


def test_redeploy_under_load_fails_no_request(service):
    promote_to_production(service.client, "housing-price", service.versions[0])  # a known start, whatever ran before
    assert deploy("housing-price", service.versions[0], "production") == service.url
    with continuous_load(service.url) as load:
        time.sleep(1)
        promote_to_production(service.client, "housing-price", service.versions[1])
        result = deploy_through_dagster()
        time.sleep(2)
    assert result.success
    assert load.failures == []
    assert load.versions == set(service.versions)


def test_a_version_failing_inside_the_replica_leaves_the_old_one_serving(service, tmp_path):
    production = service.client.get_model_version_by_alias("housing-price", "production").version
    serving = call(service.url, "/predict", REFERENCE_REQUEST)[1]["response"]["model_version"]  # whatever ran before
    source = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/housing-price/{service.versions[1]}")) / "artifacts"
    (tmp_path / "weights.pth").write_bytes(b"not a torch file")
    shutil.copy(source / "model.json", tmp_path / "model.json")
    with mlflow.start_run(run_name="broken"):
        info = log_pyfunc({"weights": tmp_path / "weights.pth", "model": tmp_path / "model.json"}, tmp_path / "code")
    broken = str(mlflow.register_model(info.model_uri, "housing-price").version)

    promote_to_production(service.client, "housing-price", broken)
    try:
        refused = deploy_through_dagster()  # the asset's probe refuses it, naming why
        assert not refused.success
        failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.event_specific_data.error.message
        assert "refused to deploy" in message and "does not load" in message

        with continuous_load(service.url) as load:
            with pytest.raises(RuntimeError, match="failed"):
                deploy("housing-price", broken, None)  # past the probe: Serve's replicas fail to start
        assert load.failures == [] and load.versions == {serving}
    finally:
        promote_to_production(service.client, "housing-price", production)


def _served(url: str, headers: dict | None = None) -> dict:
    return call(url, "/model", headers=headers)[1]["response"]


def _ray_stored_config() -> bytes:
    """Everything Serve keeps in Ray's GCS key-value store (its checkpoints hold each
    deployment's init arguments) and what `serve.status()` reports."""
    from ray.experimental import internal_kv
    from ray.serve._private.storage.kv_store import SERVE_INTERNAL_KV_NAMESPACE

    keys = internal_kv._internal_kv_list("", namespace=SERVE_INTERNAL_KV_NAMESPACE)
    stored = [internal_kv._internal_kv_get(k, namespace=SERVE_INTERNAL_KV_NAMESPACE) or b"" for k in keys]
    return b"".join(stored) + str(serve.status()).encode()


def _files_under(*roots: str | Path) -> bytes:
    return b"".join(p.read_bytes() for root in roots for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def test_credentials_and_api_keys_never_reach_ray_logs_or_lake_and_logs_reach_s3(service, tmp_path):
    """Fake credentials in the deploying process: replicas get them from a credentials file,
    Ray stores only locations; API keys set only where the deploy runs (the session's Ray was
    started without them) are enforced, reported by the ingress, and never written anywhere."""
    secret_id, secret_key, api_key, env_key = (f"FAKE{uuid.uuid4().hex.upper()}" for _ in range(4))
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {secret_id}\naws_secret_access_key = {secret_key}\n")
    (tmp_path / "api-keys").write_text(f"{api_key}\n")
    s3_env = s3_environment(service.moto, tmp_path / "s3-home")
    s3_env.pop("BRIDGE_HOME")
    s3_env |= {"AWS_ACCESS_KEY_ID": secret_id, "AWS_SECRET_ACCESS_KEY": secret_key, "BRIDGE_API_KEYS": env_key,
               "AWS_SHARED_CREDENTIALS_FILE": str(credentials), "BRIDGE_API_KEYS_FILE": str(tmp_path / "api-keys")}  # fmt: skip
    for name, value in s3_env.items():
        service.patch.setenv(name, value)
    version = _served(service.url)["model_version"]
    try:
        url = deploy("housing-price", version, "production")  # same version, logs to the bucket
        assert api_key_status().startswith("API keys: enforced (2 key(s) from BRIDGE_API_KEYS/BRIDGE_API_KEYS_FILE at deploy)")
        status, body, _ = call(url, "/predict", REFERENCE_REQUEST)
        assert status == 401 and body["message"].startswith("missing API key")
        assert call(url, "/predict", REFERENCE_REQUEST, {"X-API-Key": "wrong"})[0] == 401
        assert call(url, "/predict", REFERENCE_REQUEST, {"X-API-Key": env_key})[0] == 200
        assert call(url, "/health")[0] == 200
        ids, expected = _traffic(url, f"s3-{uuid.uuid4().hex[:6]}", {"Authorization": f"Bearer {api_key}"})
        s3_store = StorageSettings.from_env().open()
        logs = _logged(s3_store, ids, expected)
        assert s3_store.uri("interactions/").startswith("s3://bridge-test-")
        assert logs.height == expected and dict(logs.group_by("status").len().iter_rows()) == {200: 12, 422: 1, 413: 1}
        assert np.all(logs.filter(pl.col("status") == 200)["prediction"].to_numpy() > 0)
        stored = _ray_stored_config()
        assert s3_env["BRIDGE_S3_BUCKET"].encode() in stored  # the scan does see the replicas' init arguments
        lake = b"".join(s3_store.get_bytes(k) for k in s3_store.list(""))
        written = stored + lake + _files_under(service.env["BRIDGE_RAY_TMPDIR"], service.env["BRIDGE_HOME"])
        for secret in (secret_id, secret_key, api_key, env_key):
            assert secret.encode() not in written
        refused = send_traffic(s3_store, url, rate=20, duration=0.5, seed=11, traffic_id=f"nokey-{uuid.uuid4().hex[:6]}")
        assert dict(refused.statuses) == {401: 10} and refused.labels_withheld == 0 and not s3_store.exists(refused.withheld_key)
        traffic_id = f"withkey-{uuid.uuid4().hex[:6]}"  # `bridge traffic` takes the key from BRIDGE_API_KEYS
        assert cli_main(["traffic", "--url", url, "--rate", "20", "--duration", "0.5", "--traffic-id", traffic_id, "--quiet"]) == 0
        assert s3_store.scan_parquet([withheld_key(traffic_id)]).collect().height == 10
    finally:
        for name in s3_env:
            service.patch.delenv(name, raising=False)
        deploy("housing-price", version, "production")
    assert call(service.url, "/predict", REFERENCE_REQUEST)[0] == 200  # keys off again, local lake
    assert api_key_status().startswith("API keys: OFF")


def test_records_survive_a_killed_replica_exactly_once(service):
    """Two ingress replicas under load, one SIGKILLed: every 2xx has exactly one record, none
    twice. Publishing waits 10 minutes here, so the killed replica's records reach the lake
    only through its spool, swept by a replica starting after it: it had published none of them
    at the kill, and replies it gave before the kill are found in the lake afterwards."""
    version = _served(service.url)["model_version"]
    service.patch.setenv("BRIDGE_SERVE_REPLICAS", "2")
    service.patch.setenv("BRIDGE_SERVE_LOG_FLUSH_SECONDS", "600")
    deploy("housing-price", version, "production")
    replicas: dict[int, str] = {}  # pid -> replica id, as each replica reports itself
    for _ in range(100):
        served = _served(service.url)
        replicas[served["pid"]] = served["replica"]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
    killed_pid = min(replicas)
    killed = replicas[killed_pid]
    answered: dict[str, int] = {}
    stop = threading.Event()
    tag = f"kill-{uuid.uuid4().hex[:6]}"

    def client(worker: int) -> None:
        for i in range(10**6):
            if stop.is_set():
                return
            request_id = f"{tag}-{worker}-{i}"
            try:
                answered[request_id] = call(service.url, "/predict", REFERENCE_REQUEST, {"X-Request-ID": request_id})[0]
            except Exception:  # noqa: BLE001 - refused before the app: the client counts it
                answered[request_id] = -1

    senders = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for sender in senders:
        sender.start()
    try:
        time.sleep(3)
        published = read_interactions(service.store).filter(pl.col("request_id").str.starts_with(tag) & (pl.col("replica") == killed))
        killed_at = datetime.now(UTC)
        os.kill(killed_pid, signal.SIGKILL)
        time.sleep(3)
    finally:
        stop.set()
        for sender in senders:
            sender.join()
        service.patch.setenv("BRIDGE_SERVE_REPLICAS", "1")
        service.patch.setenv("BRIDGE_SERVE_LOG_FLUSH_SECONDS", service.env["BRIDGE_SERVE_LOG_FLUSH_SECONDS"])
        deploy("housing-price", version, "production")  # graceful: the survivors publish on shutdown
    ok = {request_id for request_id, status in answered.items() if 200 <= status < 300}
    assert len(ok) > 100
    deadline = time.monotonic() + 90
    while True:  # the orphaned spool is published by a starting replica's first sweep
        logs = read_interactions(service.store).filter(pl.col("request_id").str.starts_with(tag))
        if ok <= set(logs["request_id"]) or time.monotonic() > deadline:
            break
        time.sleep(1)
    counts = dict(logs.group_by("request_id").len().iter_rows())
    assert {request_id for request_id in ok if counts.get(request_id) != 1} == set()  # every 2xx exactly once
    assert max(counts.values()) == 1  # nothing twice, whatever its status
    assert logs.filter(pl.col("request_id").is_in(list(ok)))["status"].unique().to_list() == [200]
    assert published.height == 0  # at the kill, the killed replica had published nothing of this load ...
    from_killed = logs.filter(pl.col("request_id").is_in(list(ok)) & (pl.col("replica") == killed))
    assert from_killed.height > 0 and (from_killed["timestamp"] < killed_at).all()  # ... yet its replies are in the lake


def _scraped(*labels: str, timeout: float = 90.0) -> list[str]:
    """`ray_bridge_requests_total` lines with `labels` from the head node's Ray metrics port
    (Ray exports application metrics every few seconds)."""
    port = ClusterSettings.from_env().ports(0).ray_named(True)["--metrics-export-port"]
    deadline = time.monotonic() + timeout
    while True:
        lines = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines()
        wanted = [line for line in lines if line.startswith("ray_bridge_requests_total") and all(label in line for label in labels)]
        if wanted or time.monotonic() > deadline:
            assert wanted, [line for line in lines if "bridge" in line][:20]
            return lines
        time.sleep(2)


def _known_load(url: str, tag: str, clients: int = 8, each: int = 40) -> dict[str, int]:
    """`clients` threads sending `each` predictions at once, every request its own known id
    (also its `X-Client-ID`); each id's status."""
    statuses: dict[str, int] = {}

    def client(index: int) -> None:
        for i in range(each):
            request_id = f"{tag}-{index}-{i}"
            statuses[request_id] = call(url, "/predict", {**REFERENCE_REQUEST, "area": 1000 + i}, {"X-Request-ID": request_id, "X-Client-ID": request_id})[0]

    senders = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return statuses


def test_ab_sticky_exact_records_under_load_weight_change_in_place_and_ending_fails_no_request(service):
    version = _served(service.url)["model_version"]
    other = next(v for v in service.versions if v != version)
    versions = {"production": version, "staging": other}
    deploy("housing-price", version, "production", staging_version=other, staging_weight=0.5, salt="ab-test")
    clients = [f"ab-{uuid.uuid4().hex[:6]}-{i}" for i in range(40)]
    seen = {}
    for client in clients:
        status, body, headers = call(service.url, "/predict", REFERENCE_REQUEST, {"X-Client-ID": client, "X-Request-ID": client})
        assert status == 200 and headers["X-Variant"] == body["response"]["variant"]
        seen[client] = (body["response"]["variant"], body["response"]["model_version"])
    assert {client: variant for client, (variant, _) in seen.items()} == {c: assign("ab-test", c, 0.5) for c in clients}
    assert set(seen.values()) == set(versions.items())
    again = call(service.url, "/predict", REFERENCE_REQUEST, {"X-Client-ID": clients[0]})[1]["response"]
    assert (again["variant"], again["model_version"]) == seen[clients[0]]  # sticky per client
    scraped = _scraped(f'model_version="{other}"', 'variant="staging"')  # where Prometheus scrapes Serve
    assert any(line.startswith("ray_bridge_request_latency_ms_bucket") for line in scraped)

    statuses = _known_load(service.url, f"exact-{uuid.uuid4().hex[:6]}")  # 320 requests, 8 at a time
    assert set(statuses.values()) == {200}
    logs = _logged(service.store, set(statuses), len(statuses))
    assert dict(logs.group_by("request_id").len().iter_rows()) == dict.fromkeys(statuses, 1)  # each exactly once
    expected = {request_id: assign("ab-test", request_id, 0.5) for request_id in statuses}
    assert {r["request_id"]: r["variant"] for r in logs.to_dicts()} == expected
    assert all(r["model_version"] == versions[r["variant"]] for r in logs.to_dicts())
    assert set(expected.values()) == {"production", "staging"}

    pid = _served(service.url)["pid"]
    with continuous_load(service.url, new_client_each_time=True) as load:
        deploy("housing-price", version, "production", staging_version=other, staging_weight=0.2, salt="ab-test")
    assert load.failures == [] and load.versions == set(versions.values())
    changed = _served(service.url)
    assert (changed["pid"], changed["experiment"]["staging_weight"]) == (pid, 0.2)  # reconfigured in place, no restart
    moved = {c for c in clients if assign("ab-test", c, 0.2) != seen[c][0]}
    assert moved and {seen[c][0] for c in moved} == {"staging"}  # a smaller weight only moves staging's clients
    assert {c: call(service.url, "/predict", REFERENCE_REQUEST, {"X-Client-ID": c})[1]["response"]["variant"] for c in clients} == {
        c: assign("ab-test", c, 0.2) for c in clients
    }

    with continuous_load(service.url, new_client_each_time=True) as load:
        deploy("housing-price", version, "production")  # ends the experiment
    assert load.failures == []
    assert {call(service.url, "/predict", REFERENCE_REQUEST, {"X-Client-ID": c})[1]["response"]["variant"] for c in clients} == {"production"}
    logs = _logged(service.store, set(clients), len(clients))
    assert {r["request_id"]: (r["variant"], r["model_version"]) for r in logs.to_dicts()} == seen
    assert logs["client_id"].to_list() == logs["request_id"].to_list()


def test_models_in_their_own_deployments_serve_alike_and_switching_placement_fails_no_request(service):
    """Placement `deployment` (for models too heavy for every ingress replica): the same
    answers and records; switching to it and back under load fails no request."""
    version = _served(service.url)["model_version"]
    other = next(v for v in service.versions if v != version)
    batch = {"records": [REFERENCE_REQUEST, {**REFERENCE_REQUEST, "area": 5000}]}
    expected = service.rounds[service.versions.index(version)].best.model.predict(pl.DataFrame(batch["records"]))
    service.patch.setenv("BRIDGE_SERVE_MODEL_PLACEMENT", "deployment")
    with continuous_load(service.url, new_client_each_time=True) as load:
        deploy("housing-price", version, "production", staging_version=other, staging_weight=0.5, salt="placed")
    assert load.failures == []
    assert serve.status().applications["bridge"].deployments.keys() >= {"ModelProduction", "ModelStaging"}
    info = _served(service.url)
    assert (info["placement"], info["model_version"], info["experiment"]["versions"]) == ("deployment", version, {"production": version, "staging": other})
    client = next(c for c in (f"placed-{i}" for i in range(100)) if assign("placed", c, 0.5) == "production")
    placed = call(service.url, "/predict/batch", batch, {"X-Client-ID": client})[1]["response"]
    assert placed["model_version"] == version and placed["predictions"] == pytest.approx(expected, rel=1e-6)
    statuses = _known_load(service.url, f"placed-{uuid.uuid4().hex[:6]}", clients=4, each=10)
    logs = _logged(service.store, set(statuses), len(statuses))
    assert set(statuses.values()) == {200} and logs.height == len(statuses)
    assert {r["request_id"]: r["variant"] for r in logs.to_dicts()} == {i: assign("placed", i, 0.5) for i in statuses}

    service.patch.setenv("BRIDGE_SERVE_MODEL_PLACEMENT", "ingress")
    with continuous_load(service.url, new_client_each_time=True) as load:
        deploy("housing-price", version, "production")  # both model deployments retire after the new ingress serves
    assert load.failures == []
    assert set(serve.status().applications["bridge"].deployments) == {"PredictionService"}
    assert _served(service.url)["placement"] == "ingress"


def test_a_clean_stop_flushes_every_buffered_record(service):
    service.patch.setenv("BRIDGE_SERVE_LOG_FLUSH_SECONDS", "600")  # only the shutdown flush can write
    url = deploy("housing-price", service.versions[1], "production")
    ids, expected = _traffic(url, f"stop-{uuid.uuid4().hex[:6]}")
    time.sleep(2)
    assert read_interactions(service.store).filter(pl.col("request_id").is_in(list(ids))).is_empty()
    stop_serving()
    assert _logged(service.store, ids, expected, timeout=5).height == expected
    service.patch.setenv("BRIDGE_SERVE_LOG_FLUSH_SECONDS", service.env["BRIDGE_SERVE_LOG_FLUSH_SECONDS"])
    assert deploy("housing-price", service.versions[1], "production") == service.url  # for later tests


@pytest.mark.parametrize(
    ("reply", "state"),
    [((503, b"no application"), "empty"), ((200, b"<html>not json</html>"), "unreadable"), ((200, b'{"response": {}}'), "unreadable"), (None, "down")],
    ids=["proxy-without-app", "not-json", "no-versions", "nothing-listening"],
)
def test_the_service_state_says_what_answers_at_the_url(reply, state):
    """What deployment decisions read: an empty Serve proxy, a reply that names no versions, and
    a port where nothing listens are three different states, each with the URL in its problem."""
    import http.server

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = reply
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), Reply) if reply else None
    if server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        found = service_state({"BRIDGE_SERVE_PORT": str(port), "BRIDGE_ENV_FILE": ""}, timeout=2)
    finally:
        if server:
            server.shutdown()
    assert found.status == state and f"127.0.0.1:{port}" in (found.problem or ""), found
