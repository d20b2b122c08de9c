"""The focus service over real HTTP: a `lensnet-serve` process on loopback, the bundled model."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from lensnet_client import FocusClient, FocusSession, frame, oip, validate_layout
from service.core.allocator import AllocatorOptions, allocate
from service.metrics import SCORED

from .hooked_service import Gate
from .live import REPO, LiveService, snapshot, wait_for_metric

FRAME = frame.MEDIA_TYPE
BUNDLED = REPO / "models" / "default"


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    service = LiveService("--max-entries", "4096", "--max-body-bytes", str(4 << 20)).wait_ready()
    yield service
    assert service.stop() == 0


def frame_body(embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, **fields: object) -> bytes:
    return frame.pack(fields, {"embeddings": embeddings, "lod": lod, "positions": positions})


def json_body(embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray, **fields: object) -> bytes:
    arrays = {
        "embeddings": embeddings.astype(np.float32).tolist(),
        "lod": lod.tolist(),
        "positions": positions.tolist(),
    }
    return json.dumps({**arrays, **fields}).encode()


def graph_scores(embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(BUNDLED / "lensnet.fp32.onnx"), providers=["CPUExecutionProvider"])
    feed = {"embeddings": embeddings[None].astype(np.float32), "lod": lod[None], "positions": positions[None]}
    return session.run(["scores"], feed)[0][0]


def test_health_ready_model_and_docs(live: LiveService) -> None:
    assert live.http.get("/healthz").json() == {"status": "alive"}
    assert live.http.get("/readyz").json() == {"status": "ready"}
    model = live.http.get("/v1/model").json()
    manifest = json.loads((BUNDLED / "manifest.json").read_text())
    assert (model["name"], model["version"]) == (manifest["model"]["name"], manifest["model"]["version"])
    assert (model["precision"], model["provider"], model["input_dtype"]) == ("fp32", "CPUExecutionProvider", "float32")
    assert model["sha256"] == manifest["files"]["lensnet.fp32.onnx"]["sha256"]
    assert (model["embed_dim"], model["block_size"], model["max_lod"]) == (256, 32, 2)
    assert live.http.get("/docs").status_code == 200
    schemas = live.http.get("/openapi.json").json()["components"]["schemas"]
    assert {"FocusRequest", "FocusResponse", "ScoreResponse", "Problem"} <= set(schemas)


def test_wire_formats_round_trip_and_agree(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(700, seed=1, dtype=np.float32)
    fields = {"options": {"w_max": 690, "max_edits": 16}, "return_scores": True}
    binary = live.http.post(
        "/v1/focus", content=frame_body(embeddings, lod, positions, **fields), headers={"content-type": FRAME}
    )
    assert binary.status_code == 200 and binary.headers["content-type"] == FRAME
    header, arrays = frame.unpack(binary.content)
    as_json = live.http.post(
        "/v1/focus",
        content=json_body(embeddings, lod, positions, **fields),
        headers={"content-type": "application/json"},
    )
    document = as_json.json()
    envelope = {
        "embeddings": {
            "dtype": "float32",
            "shape": [700, 256],
            "data": base64.b64encode(embeddings.tobytes()).decode(),
        },
        "lod": {"dtype": "int64", "shape": [700], "data": base64.b64encode(lod.tobytes()).decode()},
        "positions": {"dtype": "int64", "shape": [700], "data": base64.b64encode(positions.tobytes()).decode()},
    }
    b64 = live.http.post("/v1/focus", json={**envelope, **fields}).json()
    assert header["edits"] == document["edits"] == b64["edits"] and len(header["edits"]) > 0
    assert np.array_equal(arrays["scores"], np.asarray(document["scores"], dtype=np.float32))
    scores64 = np.frombuffer(base64.b64decode(b64["scores"]["data"]), dtype=np.float32)
    assert b64["scores"]["dtype"] == "float32" and np.array_equal(scores64, arrays["scores"])
    # Answered in kind, or as Accept asks.
    crossed = live.http.post("/v1/focus", content=frame_body(embeddings, lod, positions, **fields),
                             headers={"content-type": FRAME, "accept": "application/json"})  # fmt: skip
    assert crossed.headers["content-type"] == "application/json" and crossed.json()["edits"] == document["edits"]
    assert {"receive", "decode", "model", "allocate", "encode", "total"} <= {
        part.split(";")[0].strip() for part in binary.headers["server-timing"].split(",")
    }


def test_scores_are_the_graphs_and_edits_the_allocators(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(900, seed=2)
    options = {"w_max": 880, "tau_expand": 0.6, "max_edits": 12, "aggregation": "max", "protect_recent": 64}
    history = [{"action": "collapse", "lod": int(lod[0]), "position": int(positions[0]), "age": 1}] if lod[0] else []
    response = live.http.post(
        "/v1/focus",
        content=frame_body(embeddings, lod, positions, options=options, history=history, return_scores=True),
        headers={"content-type": FRAME},
    )
    header, arrays = frame.unpack(response.content)
    expected_scores = graph_scores(embeddings.astype(np.float32), lod, positions)
    assert np.abs(arrays["scores"] - expected_scores).max() <= 1e-6
    from service.core.allocator import HistoryItem

    local = allocate(
        validate_layout(lod, positions, 32, 2), arrays["scores"], AllocatorOptions(block_size=32, max_lod=2, **options),
        [HistoryItem(**h) for h in history],
    )  # fmt: skip
    assert header["edits"] == [edit._asdict() for edit in local.edits]
    assert (header["length_after"], header["budget_met"]) == (local.length_after, local.budget_met)
    assert header["counters"]["rejected"] == local.counters.rejected


def test_score_endpoint(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(128, seed=3)
    response = live.http.post(
        "/v1/score", content=frame_body(embeddings, lod, positions), headers={"content-type": FRAME}
    )
    header, arrays = frame.unpack(response.content)
    assert set(header) == {"model", "timings_ms"}
    assert np.abs(arrays["scores"] - graph_scores(embeddings.astype(np.float32), lod, positions)).max() <= 1e-6


def json_text(value: object) -> bytes:
    """`value` as JSON, but with every string written out as JSON text rather than quoted."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, list):
        return b"[" + b",".join(json_text(item) for item in value) + b"]"
    if isinstance(value, dict):
        return b"{" + b",".join(json.dumps(k).encode() + b":" + json_text(v) for k, v in value.items()) + b"}"
    return json.dumps(value).encode()


def _bad_requests() -> list[tuple[str, bytes, dict[str, str], int, str, str | None]]:
    """(name, body, headers, status, problem type suffix, field)."""
    e, lod, pos = snapshot(64, seed=4)
    ok = {"options": {"w_max": 64}}
    nan, inf = e.copy(), e.copy()
    nan[5, 3], inf[9, 0] = np.nan, np.inf
    bad_layout = pos.copy()
    bad_layout[10:] += 1
    f = {"content-type": FRAME}
    j = {"content-type": "application/json"}

    def frame_with(arrays: dict, fields: dict | None = None) -> bytes:
        return frame.pack(ok if fields is None else fields, arrays)

    bogus_dtype = bytearray(frame_body(e, lod, pos, **ok))
    bogus_dtype = bogus_dtype.replace(b'"float16"', b'"bfloat1"', 1)

    def raw_frame(header: dict) -> bytes:  # a hand-written header (frame.pack only writes valid ones)
        text = json.dumps(header).encode()
        return (b"LNF1" + len(text).to_bytes(4, "little") + text).ljust(4096, b" ")

    huge = {"dtype": "float16", "shape": [2**40, 2**40], "offset": 0, "nbytes": 0}
    e_json = [[repr(float(v)) for v in row] for row in e.tolist()]  # numbers as JSON text, to splice others in
    extreme = e.astype(np.float32)
    extreme[5:9] = 3e38  # finite float32, far beyond the served range

    def json_with(**literals: object) -> bytes:
        """A JSON body whose string values are written as JSON text (numbers no Python float holds)."""
        return json_text({"embeddings": e_json, "lod": lod.tolist(), "positions": pos.tolist(), **ok, **literals})

    deep = {"dtype": "float16", "shape": [1] * 65, "offset": 0, "nbytes": 2}

    return [
        ("broken json", b'{"embeddings": [', j, 400, "malformed-body", "body"),
        ("json array not object", b"[1, 2]", j, 422, "invalid-field", "body"),
        ("bad frame magic", b"XXXX" + frame_body(e, lod, pos, **ok)[4:], f, 400, "malformed-body", "frame"),
        ("truncated frame", frame_body(e, lod, pos, **ok)[:5000], f, 400, "malformed-body", "embeddings"),
        ("unknown dtype", bytes(bogus_dtype), f, 422, "invalid-field", "embeddings.dtype"),
        ("unsupported media type", b"{}", {"content-type": "text/plain"}, 415, "unsupported-media-type",
         "Content-Type"),
        ("unacceptable accept", frame_body(e, lod, pos, **ok), {**f, "accept": "text/csv"}, 406, "not-acceptable",
         "Accept"),
        ("int embeddings", frame_with({"embeddings": e.astype(np.int32), "lod": lod, "positions": pos}), f, 422,
         "invalid-field", "embeddings.dtype"),
        ("wrong D", frame_with({"embeddings": np.zeros((64, 128), np.float16), "lod": lod, "positions": pos}), f, 422,
         "invalid-field", "embeddings.shape"),
        ("lod length", frame_with({"embeddings": e, "lod": lod[:-1], "positions": pos}), f, 422, "invalid-field",
         "lod.shape"),
        ("missing positions", frame_with({"embeddings": e, "lod": lod}), f, 422, "invalid-field", "positions"),
        ("float lod in json", json.dumps({"embeddings": e.astype(float).tolist(), "lod": [0.5] * 64,
                                          "positions": pos.tolist(), **ok}).encode(), j, 422, "invalid-field", "lod"),
        ("ragged json", json.dumps({"embeddings": [[1.0], [1.0, 2.0]], "lod": [0, 0], "positions": [0, 1],
                                    **ok}).encode(), j, 422, "invalid-field", "embeddings"),
        ("bad base64", json.dumps({"embeddings": {"dtype": "float16", "shape": [64, 256], "data": "%%%"},
                                   "lod": lod.tolist(), "positions": pos.tolist(), **ok}).encode(), j, 422,
         "invalid-field", "embeddings.data"),
        ("NaN", frame_body(nan, lod, pos, **ok), f, 422, "invalid-field", "embeddings[5]"),
        ("inf", frame_body(inf, lod, pos, **ok), f, 422, "invalid-field", "embeddings[9]"),
        ("layout", frame_body(e, lod, bad_layout, **ok), f, 422, "invalid-field", "positions[10]"),
        ("lod out of range", frame_with({"embeddings": e, "lod": np.full(64, 3), "positions": pos}), f, 422,
         "invalid-field", "lod[0]"),
        ("missing w_max", frame_body(e, lod, pos, options={}), f, 422, "invalid-field", "options.w_max"),
        ("tau out of range", frame_body(e, lod, pos, options={"w_max": 64, "tau_expand": 2.0}), f, 422, "invalid-field",
         "options.tau_expand"),
        ("string option", frame_body(e, lod, pos, options={"w_max": "64"}), f, 422, "invalid-field", "options.w_max"),
        ("unknown option", frame_body(e, lod, pos, options={"w_max": 64, "tau": 1}), f, 422, "invalid-field",
         "options.tau"),
        ("unknown field", frame_body(e, lod, pos, **ok, verbose=True), f, 422, "invalid-field", "verbose"),
        ("bad history", frame_body(e, lod, pos, **ok, history=[{"action": "expand", "lod": 0, "position": 0,
                                                                "age": 1}]), f, 422, "invalid-field", "history[0].lod"),
        ("too many entries", frame_body(*snapshot(5000, seed=5), **ok), f, 413, "too-large", "embeddings.shape"),
        ("body too large", b"x" * (5 << 20), f, 413, "too-large", "body"),
        ("unhashable dtype", raw_frame({"arrays": {"embeddings": {**huge, "dtype": ["float16"]}}}), f, 422,
         "invalid-field", "embeddings.dtype"),
        ("overflowing shape", raw_frame({"arrays": {"embeddings": huge}}), f, 400, "malformed-body",
         "embeddings.nbytes"),
        ("too many dimensions", raw_frame({"arrays": {"embeddings": deep}}), f, 400, "malformed-body",
         "embeddings.shape"),
        ("huge frame header", b"LNF1" + (2 << 20).to_bytes(4, "little") + b" " * 64, f, 413, "too-large",
         "frame.header"),
        ("extra array", frame.pack(ok, {"embeddings": e, "lod": lod, "positions": pos, "mask": lod}), f, 422,
         "invalid-field", "mask"),
        ("huge int literal", b'{"embeddings": ' + b"9" * 5000 + b"}", j, 400, "malformed-body", "body"),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, j, 400, "malformed-body", "body"),
        ("base64 overflowing shape", json.dumps({"embeddings": {"dtype": "float16", "shape": [2**62, 2**62],
                                                 "data": ""}, "lod": [0], "positions": [0], **ok}).encode(), j, 422,
         "invalid-field", "embeddings.data"),
        ("history position beyond 2**48", frame_body(e, lod, pos, **ok, history=[{"action": "collapse", "lod": 1,
                                                     "position": 2**62, "age": 1}]), f, 422, "invalid-field",
         "history[0].position"),
        ("bad deadline header", frame_body(e, lod, pos, **ok), {**f, "x-request-timeout-ms": "soon"}, 400,
         "invalid-header", "X-Request-Timeout-Ms"),
        # Every numeric conversion: numbers no float or integer type holds, non-numbers, extremes.
        ("330-digit integer embedding", json_with(embeddings=[["9" * 330, *row[1:]] for row in e_json]), j, 422,
         "invalid-field", "embeddings[0]"),
        ("json number beyond float32", json_with(embeddings=[*e_json[:3], ["1e39"] * 256, *e_json[4:]]), j, 422,
         "invalid-field", "embeddings[3]"),
        ("string embeddings", json.dumps({"embeddings": [["1.0"] * 256] * 64, "lod": lod.tolist(),
                                          "positions": pos.tolist(), **ok}).encode(), j, 422, "invalid-field",
         "embeddings"),
        ("boolean embeddings", json.dumps({"embeddings": [[True] * 256] * 64, "lod": lod.tolist(),
                                           "positions": pos.tolist(), **ok}).encode(), j, 422, "invalid-field",
         "embeddings"),
        ("null in embeddings", json_with(embeddings=[*e_json[:7], ["null"] * 256, *e_json[8:]]), j, 422,
         "invalid-field", "embeddings[7]"),
        ("330-digit integer lod", json_with(lod=["9" * 330] * 64), j, 422, "invalid-field", "lod"),
        ("float32 rows of 3e38", frame_body(extreme, lod, pos, **ok), f, 422, "invalid-field", "embeddings[5]"),
        ("330-digit integer option", json_with(options={"w_max": "9" * 330, "max_edits": "9" * 330}), j, 422,
         "invalid-field", "options.max_edits"),
        ("infinite deadline header", frame_body(e, lod, pos, **ok), {**f, "x-request-timeout-ms": "1e400"}, 400,
         "invalid-header", "X-Request-Timeout-Ms"),
        ("NaN deadline header", frame_body(e, lod, pos, **ok), {**f, "x-request-timeout-ms": "nan"}, 400,
         "invalid-header", "X-Request-Timeout-Ms"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "kind", "field"),
    _bad_requests(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_gets_a_precise_problem_and_the_service_keeps_serving(
    live: LiveService, name: str, body: bytes, headers: dict[str, str], status: int, kind: str, field: str | None
) -> None:
    response = live.http.post("/v1/focus", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"urn:lensnet:problem:{kind}" and problem["status"] == status
    assert problem["title"] and problem["detail"] and "Traceback" not in response.text
    assert problem.get("field") == field
    assert problem.get("expected") and problem.get("got") is not None  # every refusal says what to fix
    good = live.http.post(
        "/v1/focus", content=frame_body(*snapshot(64, seed=6), options={"w_max": 64}), headers={"content-type": FRAME}
    )
    assert good.status_code == 200


def test_extreme_finite_embeddings_are_the_clients_not_a_model_error(live: LiveService) -> None:
    """Finite float32 values far beyond the served range overflow inside the graph: a 422 naming
    the row and the range, never a 500 model-error (which would page as a model fault)."""
    embeddings, lod, positions = snapshot(64, seed=11, dtype=np.float32)
    embeddings[12, :] = -3e38
    before = live.metrics()["lensnet_model_errors_total"]
    body = frame_body(embeddings, lod, positions, options={"w_max": 64})
    response = live.http.post("/v1/focus", content=body, headers={"content-type": FRAME})
    problem = response.json()
    assert response.status_code == 422, response.text
    assert (problem["field"], problem["index"]) == ("embeddings[12]", 12)
    assert "65504" in problem["expected"] and problem["got"] == "a value of 3e+38"
    assert live.metrics()["lensnet_model_errors_total"] == before
    embeddings[12, :] = 6e4  # within the range: served
    body = frame_body(embeddings, lod, positions, options={"w_max": 64})
    assert live.http.post("/v1/focus", content=body, headers={"content-type": FRAME}).status_code == 200


def test_missing_and_wrong_fields_are_worded_like_the_rest(live: LiveService) -> None:
    e, lod, pos = snapshot(64, seed=12)
    expectations = {
        frame_body(e, lod, pos): ("options", "an object with w_max", "nothing"),
        frame_body(e, lod, pos, options={}): ("options.w_max", "an integer", "nothing"),
        frame_body(e, lod, pos, options={"w_max": 0}): ("options.w_max", ">= 1", "0"),
        frame_body(e, lod, pos, options={"w_max": 9, "tau_expand": 0}): ("options.tau_expand", "> 0 and <= 1", "0"),
        frame_body(e, lod, pos, options={"w_max": 9, "aggregation": "avg"}): (
            "options.aggregation", "one of 'mean', 'max' or 'min'", "'avg'"),
        frame_body(e, lod, pos, options={"w_max": 9}, return_scores="yes"): ("return_scores", "true or false", "'yes'"),
        frame_body(e, lod, pos, options={"w_max": 9}, history=[{"action": "expand"}]): (
            "history[0].lod", "an integer", "nothing"),
    }  # fmt: skip
    for body, (field, expected, got) in expectations.items():
        problem = live.http.post("/v1/focus", content=body, headers={"content-type": FRAME}).json()
        assert (problem["field"], problem["expected"], problem["got"]) == (field, expected, got)
        assert problem["detail"] == f"{field}: expected {expected}, got {got}"


def test_openapi_describes_what_the_service_accepts(live: LiveService) -> None:
    document = live.http.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert live.http.get("/metrics").headers["content-type"].startswith("text/plain")
    assert schemas["FocusOptions"]["properties"]["w_max"]["minimum"] == 1
    assert schemas["FocusOptions"]["properties"]["max_edits"]["anyOf"][0]["maximum"] == 1024
    for name in ("embeddings", "lod", "positions"):  # N >= 1
        assert schemas["FocusRequest"]["properties"][name]["anyOf"][0]["minItems"] == 1
    for name in ("FocusRequest", "ScoreRequest"):  # the loaded model's D and LOD range
        arrays = schemas[name]["properties"]
        assert arrays["embeddings"]["anyOf"][0]["items"] | {"items": None} == {
            "type": "array", "minItems": 256, "maxItems": 256, "items": None}  # fmt: skip
        assert (arrays["lod"]["anyOf"][0]["items"]["minimum"], arrays["lod"]["anyOf"][0]["items"]["maximum"]) == (0, 2)
    (timeout,) = document["paths"]["/v1/focus"]["post"]["parameters"]
    assert timeout["schema"] == {"type": "number", "exclusiveMinimum": 0}
    for code in ("408", "429", "503"):
        assert code in document["paths"]["/v1/focus"]["post"]["responses"]
    # Every method a path does not declare: 405 with Allow naming the ones it does.
    for path, operations in document["paths"].items():
        declared = {method.upper() for method in operations}
        concrete = re.sub(r"\{[^}/]+\}", "p1", path)  # a value for each path parameter ({id}, {model_name})
        for method in {"GET", "POST", "PUT", "DELETE", "PATCH", "TRACE", "OPTIONS"} - declared:
            response = live.http.request(method, concrete)
            assert response.status_code == 405, (method, path)
            assert set(response.headers["allow"].replace(" ", "").split(",")) >= declared, (method, path)
            assert response.headers["content-type"] == "application/problem+json"


def test_unknown_routes_and_methods_are_problems(live: LiveService) -> None:
    missing = live.http.get("/v2/focus")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    wrong_method = live.http.get("/v1/focus")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.headers["content-type"] == "application/problem+json"


def test_a_client_gone_mid_upload_is_not_an_error(live: LiveService) -> None:
    """Content-Length promises more than arrives before the client hangs up: no 500, no
    traceback in the log, counted as 499, and the service keeps serving."""
    body = frame_body(*snapshot(64, seed=10), options={"w_max": 64})
    with socket.create_connection(("127.0.0.1", live.port)) as connection:
        head = f"POST /v1/focus HTTP/1.1\r\nHost: x\r\nContent-Type: {FRAME}\r\nContent-Length: {len(body) * 4}\r\n\r\n"
        connection.sendall(head.encode() + body)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    key = 'lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="499"}'
    while live.metrics().get(key, 0) < 1:
        assert time.monotonic() < deadline, "the disconnect was never recorded"
        time.sleep(0.05)
    assert "Traceback" not in live.log() and "unhandled error" not in live.log()
    good = live.http.post("/v1/focus", content=body, headers={"content-type": FRAME})
    assert good.status_code == 200


def test_a_bug_while_scoring_is_a_500_problem_and_the_service_keeps_serving(tmp_path: Path) -> None:
    """A failure that is no one's input (here planted in the response encoder) answers an
    internal-error problem without its text, is logged with its traceback, counted under 500, and
    the next request is served."""
    failing = tmp_path / "fail"
    failing.mkdir()
    service = LiveService(hooks={"encode": {"fail": str(failing)}}).wait_ready()
    body = frame_body(*snapshot(64, seed=11), options={"w_max": 64})
    try:
        (failing / "armed").touch()
        failed = service.http.post("/v1/focus", content=body, headers={"content-type": FRAME})
        assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
        problem = failed.json()
        assert problem["type"] == "urn:lensnet:problem:internal-error" and "planted" not in problem["detail"]
        assert service.metrics()['lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="500"}'] == 1
        (failing / "armed").unlink()
        assert service.http.post("/v1/focus", content=body, headers={"content-type": FRAME}).status_code == 200
        assert "unhandled error on /v1/focus" in service.log() and "a planted failure" in service.log()
    finally:
        assert service.stop() == 0


def test_metrics_count_exactly_what_was_served() -> None:
    """Every allocation counter moves by exactly what the answers report; with a budget no request
    can miss (60 s), none is counted over it."""
    service = LiveService("--latency-budget-ms", "60000").wait_ready()
    try:
        with FocusClient(service.url) as client:
            edits: Counter[tuple[str, str, str]] = Counter()
            entries = Counter()
            clamps: Counter[str] = Counter()
            rejected: Counter[str] = Counter()
            unmet = 0
            # w_max = 1 cannot be met (max_edits 1 collapses one group): the step stays over budget.
            for seed, (n, w_max, max_edits) in enumerate(((300, 260, 20), (500, 460, 20), (700, 660, 20), (64, 1, 1))):
                embeddings, lod, positions = snapshot(n, seed=seed)
                result = client.focus(embeddings, lod, positions, w_max=w_max, max_edits=max_edits)
                edits.update((e.action, e.cause, str(e.lod_before)) for e in result.edits)
                entries.update(str(level) for level in lod.tolist())
                clamps.update(result.counters["clamped"])
                rejected.update(result.counters["rejected"])
                unmet += not result.budget_met
            client.score(*snapshot(100, seed=9)[:3])
            entries.update(str(level) for level in snapshot(100, seed=9)[1].tolist())
        assert unmet == 1 and clamps.total() > 0 and rejected.total() > 0 and edits.total() > 0
        m = service.metrics()
        for (action, cause, lod), count in edits.items():
            assert m[f'lensnet_edits_total{{action="{action}",cause="{cause}",lod="{lod}"}}'] == count
        assert sum(v for k, v in m.items() if k.startswith("lensnet_edits_total{")) == sum(edits.values())
        for lod, count in entries.items():
            assert m[f'lensnet_entry_score_count{{lod="{lod}"}}'] == count
        for action in ("expand", "collapse"):
            assert m[f'lensnet_clamps_total{{action="{action}"}}'] == clamps[action]
        for reason in ("protected", "cooldown", "threshold", "overlap", "budget", "max_edits"):
            assert m[f'lensnet_allocator_rejections_total{{reason="{reason}"}}'] == rejected[reason]
        assert m["lensnet_budget_unmet_total"] == 1
        assert m['lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="200"}'] == 4
        assert m['lensnet_request_duration_seconds_count{endpoint="/v1/score",status="200"}'] == 1
        assert (m["lensnet_working_context_entries_count"], m["lensnet_working_context_entries_sum"]) == (5, 1664)
        assert m['lensnet_stage_duration_seconds_count{stage="model"}'] == 5
        assert {k: v for k, v in m.items() if k.startswith("lensnet_requests_over_budget_total")} == {
            f'lensnet_requests_over_budget_total{{endpoint="{e}"}}': 0 for e in SCORED
        }
        assert m["lensnet_model_ready"] == 1
        assert any(k.startswith("lensnet_model_info{") and 'precision="fp32"' in k for k in m)
        assert 'lensnet_request_duration_seconds_bucket{endpoint="/v1/focus",le="60.0",status="200"}' in m
    finally:
        assert service.stop() == 0


def test_requests_slower_than_the_budget_are_counted_per_endpoint() -> None:
    """A 50 ms model against a 1 ms budget: each scored request counts once, under its endpoint."""
    service = LiveService("--latency-budget-ms", "1", hooks={"model": 0.05}).wait_ready()
    try:
        before = service.metrics()
        embeddings, lod, positions = snapshot(64, seed=14)
        with FocusClient(service.url) as client:
            client.focus(embeddings, lod, positions, w_max=64)
            client.score(embeddings, lod, positions)
            session = FocusSession(client, w_max=64)
            result = session.open(embeddings, lod, positions)
            created = np.zeros((sum(e.added for e in result.edits), 256), np.float16)
            session.step(created=created)
        body, headers = oip.pack({"embeddings": embeddings, "lod": lod, "positions": positions})
        assert service.http.post("/v2/models/lensnet-demo/infer", content=body, headers=headers).status_code == 200
        service.http.get("/v1/model")
        after = service.metrics()
        for endpoint in SCORED:
            key = f'lensnet_requests_over_budget_total{{endpoint="{endpoint}"}}'
            assert after[key] == before[key] + 1, endpoint
        assert not any(k.startswith("lensnet_requests_over_budget_total") and "/v1/model" in k for k in after)
    finally:
        assert service.stop() == 0


def test_known_series_exist_from_startup_and_process_metrics_are_exposed() -> None:
    """Every label combination the service can produce exists at 0 before its first increment
    (rate() and increase() lose the first increments of a series born with them), and the
    process' own resources are exposed (RSS, CPU, file descriptors)."""
    service = LiveService().wait_ready()
    try:
        m = service.metrics()
        edits = [("expand", "threshold", 1), ("expand", "threshold", 2)] + [
            ("collapse", cause, lod) for cause in ("threshold", "budget", "make_room") for lod in (0, 1)
        ]
        for action, cause, lod in edits:
            assert m[f'lensnet_edits_total{{action="{action}",cause="{cause}",lod="{lod}"}}'] == 0
        assert sum(1 for key in m if key.startswith("lensnet_edits_total{")) == len(edits)
        reasons = ("overload", "not_ready", "shutting_down", "deadline", "deadline_short", "too_large", "body_timeout")
        for reason in reasons:
            assert m[f'lensnet_requests_refused_total{{reason="{reason}"}}'] == 0
        for endpoint in ("/v1/focus", "/v1/score"):
            for status in (200, 400, 405, 406, 408, 413, 415, 422, 429, 499, 500, 503, 504):
                assert m[f'lensnet_request_duration_seconds_count{{endpoint="{endpoint}",status="{status}"}}'] == 0
        assert 'lensnet_request_duration_seconds_count{endpoint="/readyz",status="503"}' in m
        for level in (0, 1, 2):
            assert m[f'lensnet_entry_score_count{{lod="{level}"}}'] == 0
        assert m["process_resident_memory_bytes"] > 50e6  # ONNX Runtime and numpy are loaded
        assert m["process_open_fds"] > 0 and m["process_cpu_seconds_total"] > 0
    finally:
        assert service.stop() == 0


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveService, Gate]]:
    """A service whose model stage waits at a gate (armed once ready, open between tests): one
    inference slot and one queue place, so a request held in the model makes the next one queue
    and the one after that overflow, whatever this machine's speed."""
    gate = Gate(tmp_path_factory.mktemp("model-gate"))
    service = LiveService("--max-concurrency", "1", "--queue-size", "1", hooks={"model": gate.spec}).wait_ready()
    gate.arm().open()
    yield service, gate
    gate.open()
    assert service.stop() == 0


def post_frame(service: LiveService, body: bytes, **headers: str) -> httpx.Response:
    """POST /v1/focus on a connection of its own (for requests sent from other threads)."""
    return httpx.post(service.url + "/v1/focus", content=body, headers={"content-type": FRAME, **headers}, timeout=60)


def test_overload_answers_429_with_retry_after_and_clients_retry(gated: tuple[LiveService, Gate]) -> None:
    service, gate = gated
    body = frame_body(*snapshot(64, seed=7), options={"w_max": 64})
    refused_key = 'lensnet_requests_refused_total{reason="overload"}'
    before = service.metrics()
    gate.close()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            entered = gate.entered()
            running = pool.submit(post_frame, service, body)
            gate.wait_entered(entered + 1)  # holds the only slot
            queued = pool.submit(post_frame, service, body)
            wait_for_metric(service, "lensnet_queued_requests", 1)  # holds the only queue place
            m = service.metrics()
            assert (m["lensnet_in_flight_requests"], m["lensnet_queued_requests"]) == (2, 1)
            refused = [post_frame(service, body) for _ in range(3)]
            assert [r.status_code for r in refused] == [429] * 3
            assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
            assert refused[0].json()["type"] == "urn:lensnet:problem:overloaded"
            assert service.metrics()[refused_key] == before[refused_key] + 3

            # The client's retries honour Retry-After and get through once the slot frees up.
            def client_call() -> int:
                with FocusClient(service.url, retries=3, max_backoff=5.0) as client:
                    return client.focus(*snapshot(64, seed=7), w_max=64).length_before

            retried = pool.submit(client_call)
            wait_for_metric(service, refused_key, before[refused_key] + 4)  # its first try was refused
            gate.open()
            assert running.result().status_code == queued.result().status_code == 200
            assert retried.result() == 64
    finally:
        gate.open()
    after = service.metrics()
    assert after[refused_key] == before[refused_key] + 4
    key = 'lensnet_request_duration_seconds_count{endpoint="/v1/focus",status="%s"}'
    assert after[key % 429] - before[key % 429] == 4 and after[key % 200] - before[key % 200] == 3
    assert (after["lensnet_in_flight_requests"], after["lensnet_queued_requests"]) == (0, 0)


def test_deadline_passed_during_the_model_is_504_with_nothing_recorded(gated: tuple[LiveService, Gate]) -> None:
    service, gate = gated
    before = service.metrics()
    body = frame_body(*snapshot(64, seed=8), options={"w_max": 64})
    gate.close()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            entered = gate.entered()
            late = pool.submit(post_frame, service, body, **{"x-request-timeout-ms": "100"})
            gate.wait_entered(entered + 1)  # inside the model (it arrived before: its deadline is < 100 ms away)…
            time.sleep(0.15)  # …until its deadline has passed
            gate.open()
            response = late.result()
    finally:
        gate.open()
    assert response.status_code == 504 and response.json()["type"] == "urn:lensnet:problem:deadline-exceeded"
    assert "the model finished after the deadline" in response.json()["detail"]
    after = service.metrics()
    for reason, increment in (("deadline", 1), ("deadline_short", 0)):  # 100 ms is over the 3 ms budget
        key = f'lensnet_requests_refused_total{{reason="{reason}"}}'
        assert after[key] == before[key] + increment
    for unrecorded in ("lensnet_working_context_entries_count", 'lensnet_entry_score_count{lod="0"}'):
        assert after[unrecorded] == before[unrecorded]


def test_deadline_passed_while_queued_is_504(gated: tuple[LiveService, Gate]) -> None:
    service, gate = gated
    before = service.metrics()
    body = frame_body(*snapshot(64, seed=9), options={"w_max": 64})
    gate.close()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            entered = gate.entered()
            first = pool.submit(post_frame, service, body)
            gate.wait_entered(entered + 1)  # it holds the only slot
            queued = post_frame(service, body, **{"x-request-timeout-ms": "50"})
            assert queued.status_code == 504 and "waited for a slot" in queued.json()["detail"]
            assert gate.entered() == entered + 1  # the queued request never reached the model
            gate.open()
            assert first.result().status_code == 200
    finally:
        gate.open()
    key = 'lensnet_requests_refused_total{reason="deadline"}'
    assert service.metrics()[key] == before[key] + 1


def test_not_ready_while_warming_up(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate").arm()  # armed before start: the warm-up's first inference waits
    service = LiveService(hooks={"model": gate.spec})
    try:
        gate.wait_entered(1, timeout=60)
        ready = service.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["state"] == "loading"
        early = service.http.post(
            "/v1/focus", content=frame_body(*snapshot(64), options={"w_max": 64}), headers={"content-type": FRAME}
        )
        assert early.status_code == 503 and int(early.headers["retry-after"]) >= 1
        assert service.http.get("/healthz").status_code == 200  # alive while loading
        m = service.metrics()
        assert m['lensnet_requests_refused_total{reason="not_ready"}'] == 1 and m["lensnet_model_ready"] == 0
        gate.open()
        service.wait_ready(120)
        assert service.metrics()["lensnet_model_ready"] == 1
    finally:
        gate.open()
        assert service.stop() == 0


def test_refuses_an_artifact_that_does_not_match_its_checksums(tmp_path: Path) -> None:
    tampered = tmp_path / "model"
    shutil.copytree(BUNDLED, tampered)
    graph = tampered / "lensnet.fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:-10] + b"\x00" * 10)
    result = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", str(tampered)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "lensnet.fp32.onnx: sha256 does not match" in result.stderr


def test_invalid_settings_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--precision", "fp8"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2 and "precision" in result.stderr


@pytest.mark.parametrize("spinning", [False, True])
def test_intra_op_spinning_is_what_the_settings_say(spinning: bool) -> None:
    from model_export.artifact import load_manifest
    from service.runtime import Scorer

    scorer = Scorer(BUNDLED, load_manifest(BUNDLED), "fp32", intra_op_threads=2, spinning=spinning)
    options = scorer.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    assert options.intra_op_num_threads == 2


def faulty_artifact(directory: Path) -> Path:
    """The bundled artifact with its fp32 graph replaced by one that has a real fault: its score is
    tanh(embedding[0]) + 0 * 1 / (embedding[0] - 7), NaN for an entry whose first value is exactly
    7 (well within the served range), otherwise finite (so it loads and warms up)."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(BUNDLED, directory)
    f = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["seven"], value=helper.make_tensor("seven", TensorProto.FLOAT, [], [7.0])),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        helper.make_node("Gather", ["embeddings", "axis"], ["first3"], axis=2),
        helper.make_node("Squeeze", ["first3", "two"], ["first"]),
        helper.make_node("Sub", ["first", "seven"], ["shifted"]),
        helper.make_node("Reciprocal", ["shifted"], ["pole"]),
        helper.make_node("Mul", ["pole", "zero"], ["fault"]),
        helper.make_node("Tanh", ["first"], ["squashed"]),
        helper.make_node("Add", ["squashed", "fault"], ["scores"]),
        helper.make_node("IsNaN", ["first"], ["nan"]),
        helper.make_node("IsInf", ["first"], ["inf"]),
        helper.make_node("Or", ["nan", "inf"], ["non_finite"]),
    ]
    graph = helper.make_graph(
        nodes, "faulty",
        [f("embeddings", TensorProto.FLOAT, ["batch", "n", 256]), f("lod", TensorProto.INT64, ["batch", "n"]),
         f("positions", TensorProto.INT64, ["batch", "n"])],
        [f("scores", TensorProto.FLOAT, ["batch", "n"]), f("non_finite", TensorProto.BOOL, ["batch", "n"])],
        initializer=[helper.make_tensor("two", TensorProto.INT64, [1], [2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    graph_file = directory / "lensnet.fp32.onnx"
    graph_file.write_bytes(model.SerializeToString())
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["lensnet.fp32.onnx"] = {
        "size": graph_file.stat().st_size,
        "sha256": hashlib.sha256(graph_file.read_bytes()).hexdigest(),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_non_finite_scores_from_inputs_in_range_are_a_model_error(tmp_path: Path) -> None:
    """The other side of the served range: a graph that fails on a finite, in-range input is a
    model fault (500 model-error, counted), not the client's (422)."""
    service = LiveService("--model-dir", str(faulty_artifact(tmp_path / "faulty")), "--precision", "fp32").wait_ready()
    try:
        embeddings, lod, positions = snapshot(64, seed=13, dtype=np.float32)
        body = frame_body(embeddings, lod, positions, options={"w_max": 64})
        assert service.http.post("/v1/focus", content=body, headers={"content-type": FRAME}).status_code == 200
        embeddings[9, 0] = 7.0
        body = frame_body(embeddings, lod, positions, options={"w_max": 64})
        response = service.http.post("/v1/focus", content=body, headers={"content-type": FRAME})
        assert response.status_code == 500 and response.json()["type"] == "urn:lensnet:problem:model-error"
        assert service.metrics()["lensnet_model_errors_total"] == 1
    finally:
        assert service.stop() == 0
