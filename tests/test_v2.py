"""The Open Inference Protocol (KServe v2) against a live service, through the real Triton client
(`tritonclient.http`): health, metadata, scoring equal to /v1/score bit for bit, errors, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from lensnet_client import FocusClient, oip

from .hooked_service import Gate
from .live import REPO, LiveService, snapshot

MODEL = json.loads((REPO / "models" / "default" / "manifest.json").read_text())["model"]
README = REPO / "README.md"
NAME, VERSION = MODEL["name"], MODEL["version"]
STREAM_MIN = 64 << 10  # bodies from 64 KiB on are decoded while they arrive: both paths get tested
MAX_ENTRIES = 1024
MAX_BODY = 4 << 20


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    flags = ("--stream-min-bytes", str(STREAM_MIN), "--max-entries", str(MAX_ENTRIES),
             "--max-body-bytes", str(MAX_BODY))  # fmt: skip
    service = LiveService(*flags).wait_ready()
    yield service
    assert service.stop() == 0


@pytest.fixture(scope="module")
def client(live: LiveService) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(live.url.removeprefix("http://")) as c:
        yield c


def inputs(
    embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, binary: bool = True
) -> list[triton.InferInput]:
    """The three inputs as tritonclient builds them (batch axis of 1 added)."""
    made = []
    for name, array in (("embeddings", embeddings), ("lod", lod), ("positions", positions)):
        tensor = triton.InferInput(name, [1, *array.shape], triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array[None], binary_data=binary)
        made.append(tensor)
    return made


def v1_scores(live: LiveService, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with FocusClient(live.url) as focus:
        return focus.score(embeddings, lod, positions).scores


def error(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_health_and_server_metadata(client: triton.InferenceServerClient, live: LiveService) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, VERSION)
    assert not client.is_model_ready("another-model") and not client.is_model_ready(NAME, "7")
    assert live.http.get("/v2/health/ready").content == b""  # the protocol's empty health body
    metadata = client.get_server_metadata()
    assert metadata["name"] == "lensnet-focus" and "binary_tensor_data" in metadata["extensions"]
    infer = live.http.get("/openapi.json").json()["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}


def test_model_metadata_and_config_describe_the_loaded_graph(
    client: triton.InferenceServerClient, live: LiveService
) -> None:
    served = live.http.get("/v1/model").json()
    d, dtype = served["embed_dim"], {"float32": "FP32", "float16": "FP16"}[served["input_dtype"]]
    for metadata in (client.get_model_metadata(NAME), client.get_model_metadata(NAME, VERSION)):
        assert (metadata["name"], metadata["versions"], metadata["platform"]) == (NAME, [VERSION], "onnx_onnxv1")
        assert metadata["inputs"] == [
            {"name": "embeddings", "datatype": dtype, "shape": [1, -1, d]},
            {"name": "lod", "datatype": "INT64", "shape": [1, -1]},
            {"name": "positions", "datatype": "INT64", "shape": [1, -1]},
        ]
        assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [1, -1]}]
    config = client.get_model_config(NAME)
    assert config["max_batch_size"] == 0 and [t["dims"] for t in config["input"]] == [[1, -1, d], [1, -1], [1, -1]]
    assert error(client.get_model_metadata, "another-model").status() == "404"


@pytest.mark.parametrize("n", [64, 300], ids=["whole", "streamed"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_inference_equals_v1_score_bit_for_bit(
    client: triton.InferenceServerClient, live: LiveService, n: int, dtype: type, binary: bool
) -> None:
    embeddings, lod, positions = snapshot(n, seed=n, dtype=dtype)
    lod = lod.astype(np.int8)  # any integer type, as on /v1
    outputs = [triton.InferRequestedOutput("scores", binary_data=binary)]
    result = client.infer(NAME, inputs(embeddings, lod, positions, binary), outputs=outputs, request_id="step-7")
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (1, n)
    assert np.array_equal(scores[0], v1_scores(live, embeddings, lod, positions))
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (NAME, VERSION, "step-7")
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary


def test_versioned_path_default_binary_output_and_server_timing(
    client: triton.InferenceServerClient, live: LiveService
) -> None:
    embeddings, lod, positions = snapshot(128, seed=5)
    result = client.infer(NAME, inputs(embeddings, lod, positions), model_version=VERSION)  # no outputs: binary
    assert np.array_equal(result.as_numpy("scores")[0], v1_scores(live, embeddings, lod, positions))
    body, headers = oip.pack({"embeddings": embeddings, "lod": lod, "positions": positions})
    raw = live.http.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
    stages = {part.split(";")[0].strip() for part in raw.headers["server-timing"].split(",")}
    assert {"admit", "receive", "queue", "decode", "model", "telemetry", "encode", "total"} <= stages
    length = int(raw.headers[oip.HEADER_LENGTH])
    assert raw.headers["content-type"] == "application/octet-stream" and len(raw.content) == length + 4 * 128
    assert np.array_equal(np.frombuffer(raw.content[length:], "<f4"), result.as_numpy("scores")[0])


def test_mixed_json_and_binary_inputs(client: triton.InferenceServerClient, live: LiveService) -> None:
    embeddings, lod, positions = snapshot(96, seed=6)
    tensors = inputs(embeddings, lod, positions)
    tensors[1].set_data_from_numpy(lod[None], binary_data=False)  # lod inline in the JSON, the others binary
    result = client.infer(NAME, tensors)
    assert np.array_equal(result.as_numpy("scores")[0], v1_scores(live, embeddings, lod, positions))


def test_errors_are_the_protocol_s_and_the_service_keeps_serving(
    client: triton.InferenceServerClient, live: LiveService
) -> None:
    embeddings, lod, positions = snapshot(64, seed=7)

    def refused(*tensors: triton.InferInput, **kwargs: object) -> tuple[str, str]:
        exc = error(client.infer, NAME, list(tensors), **kwargs)
        return exc.status(), exc.message()

    good = inputs(embeddings, lod, positions)
    batch = inputs(embeddings, lod, positions)
    batch[0] = triton.InferInput("embeddings", [2, 64, 256], "FP16")
    batch[0].set_data_from_numpy(np.stack([embeddings, embeddings]))
    assert refused(*batch) == ("422", "embeddings.shape: expected [1, N, D] (batch 1: one WC snapshot per "
                                      "request), got [2, 64, 256]")  # fmt: skip
    wrong_d = inputs(embeddings[:, :128].copy(), lod, positions)
    assert refused(*wrong_d) == ("422", "embeddings.shape: expected [1, N, 256], got [1, 64, 128]")
    poisoned = embeddings.copy()
    poisoned[9, 3] = np.nan
    status, message = refused(*inputs(poisoned, lod, positions))
    assert status == "422" and message.startswith("embeddings[9]: expected finite values, got NaN")
    broken = positions.copy()
    broken[10] += 1
    status, message = refused(*inputs(embeddings, lod, broken))
    assert status == "422" and "10" in message
    status, message = refused(*inputs(embeddings, lod, positions[:-1]))
    assert (status, message) == ("422", "positions.shape: expected [1, 64] (one per embedding), got [1, 63]")
    status, message = refused(*good, timeout=1000)  # Triton's timeout parameter: refused, not ignored
    assert status == "422" and message.startswith("parameters.timeout")
    status, message = refused(*good, outputs=[triton.InferRequestedOutput("edits")])
    assert status == "422" and message.startswith("outputs[0].name")
    status, message = refused(*good, request_compression_algorithm="gzip")
    assert status == "415" and "Content-Encoding" in message
    status, message = refused(*good, headers={"X-Request-Timeout-Ms": "0.001"})
    assert status == "504"
    status, message = refused(*inputs(*snapshot(MAX_ENTRIES + 1, seed=8)))  # the body fits, N does not
    assert (status, message) == ("413", f"embeddings.shape: at most {MAX_ENTRIES} entries accepted, got 1025 entries")
    huge = snapshot(MAX_ENTRIES, seed=9, dtype=np.float32)
    status, message = refused(*inputs(*huge, binary=False))  # ~6 MB of JSON numbers
    assert status == "413" and message.startswith(f"body: at most {MAX_BODY} bytes")
    assert error(client.infer, "another-model", good).status() == "404"
    for body, headers, status_code in (
        (b"{not json", {}, 400),
        (b'{"inputs": []}', {oip.HEADER_LENGTH: "99"}, 400),  # the JSON would run past the body
        (b'{"inputs": 3}', {}, 422),
    ):
        response = live.http.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        assert response.status_code == status_code and set(response.json()) == {"error"}
    assert live.http.get(f"/v2/models/{NAME}/infer").status_code == 405
    result = client.infer(NAME, good)  # still serving
    assert np.array_equal(result.as_numpy("scores")[0], v1_scores(live, embeddings, lod, positions))


def test_metrics_count_v2_under_its_own_endpoint_label(client: triton.InferenceServerClient, live: LiveService) -> None:
    def sample(name: str) -> float:
        return live.metrics().get(name, 0.0)

    ok = 'lensnet_request_duration_seconds_count{endpoint="/v2/infer",status="200"}'
    bad = 'lensnet_request_duration_seconds_count{endpoint="/v2/infer",status="422"}'
    entries = "lensnet_working_context_entries_count"
    before = (sample(ok), sample(bad), sample(entries))
    embeddings, lod, positions = snapshot(32, seed=10)
    for _ in range(3):
        client.infer(NAME, inputs(embeddings, lod, positions))
    client.infer(NAME, inputs(embeddings, lod, positions), model_version=VERSION)
    error(client.infer, NAME, inputs(embeddings, lod, positions[::-1].copy()))
    after = (sample(ok), sample(bad), sample(entries))
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (4, 1, 4)
    assert 'lensnet_requests_over_budget_total{endpoint="/v2/infer"}' in live.metrics()


def test_readme_tritonclient_example_runs(live: LiveService) -> None:
    """The README's "Using it from Triton/KServe tooling" example, as written."""
    (example,) = re.findall(r"<!-- example-v2: tritonclient -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "LENSNET_URL": live.url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(512,) float32"


def test_not_ready_while_warming_up_in_the_protocol_s_terms(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate").arm()  # armed before start: the warm-up's first inference waits
    service = LiveService(hooks={"model": gate.spec})
    try:
        gate.wait_entered(1, timeout=60)
        ready = service.http.get("/v2/health/ready")
        assert ready.status_code == 400 and ready.content == b""  # false, while loading
        assert service.http.get("/v2/health/live").status_code == 200
        assert service.http.get(f"/v2/models/{NAME}/ready").status_code == 400
        body, headers = oip.pack(dict(zip(("embeddings", "lod", "positions"), snapshot(64), strict=True)))
        early = service.http.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        assert early.status_code == 503 and int(early.headers["retry-after"]) >= 1
        assert early.json() == {"error": "model loading"}
        gate.open()
        service.wait_ready(120)
        assert service.http.get("/v2/health/ready").status_code == 200
    finally:
        gate.open()
        assert service.stop() == 0


def test_overload_is_429_with_retry_after_in_the_protocol_s_terms(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    service = LiveService("--max-concurrency", "1", "--queue-size", "0", hooks={"model": gate.spec}).wait_ready()
    gate.arm()
    try:
        body, headers = oip.pack(dict(zip(("embeddings", "lod", "positions"), snapshot(64, seed=7), strict=True)))

        def post() -> httpx.Response:
            return httpx.post(f"{service.url}/v2/models/{NAME}/infer", content=body, headers=headers, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(post)
            gate.wait_entered(1)  # it holds the only place
            refused = [post() for _ in range(3)]
            gate.open()
            assert running.result().status_code == 200
        assert [r.status_code for r in refused] == [429] * 3
        assert all(int(r.headers["retry-after"]) >= 1 and set(r.json()) == {"error"} for r in refused)
        metrics = service.metrics()
        assert metrics['lensnet_requests_refused_total{reason="overload"}'] == 3
        assert metrics['lensnet_request_duration_seconds_count{endpoint="/v2/infer",status="429"}'] == 3
        assert metrics['lensnet_request_duration_seconds_count{endpoint="/v2/infer",status="200"}'] == 1
    finally:
        gate.open()
        assert service.stop() == 0
