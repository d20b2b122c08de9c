"""The v2 (Open Inference Protocol) body reader and response encoder, without a server: any
chunking decodes to the same snapshot, JSON and binary tensors agree, and every defect is a
precise 4xx."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensnet_client import oip as request_oip
from service.core import codec, oip, problems

D = 16
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def arrays(n: int = 5, dtype: np.dtype = F16, lod_dtype: str = "int64") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    embeddings = (rng.standard_normal((n, D)) * 100).astype(dtype)
    return {"embeddings": embeddings, "lod": np.zeros(n, dtype=lod_dtype), "positions": np.arange(n, dtype=np.int64)}


def decode(
    data: bytes, header_length: int | None, cuts: list[int] = (), stream_min: int = 0, declared: bool = True
) -> codec.DecodedRequest:
    reader = oip.InferReader(D, 1000, F32, len(data) if declared else None, header_length, stream_min)
    edges = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for lo, hi in itertools.pairwise(edges):
        reader.feed(data[lo:hi], more=hi < len(data))
    reader.close()
    return reader.finish()


def binary(tensors: dict[str, np.ndarray], **fields: object) -> tuple[bytes, int]:
    body, headers = request_oip.pack(tensors)
    if fields:  # rewrite the JSON part
        length = int(headers[oip.HEADER_LENGTH])
        head = json.dumps(json.loads(body[:length]) | fields).encode()
        return head + body[length:], len(head)
    return body, int(headers[oip.HEADER_LENGTH])


def as_json(tensors: dict[str, np.ndarray]) -> bytes:
    inputs = [
        {"name": name, "datatype": request_oip.DATATYPES[a.dtype.name], "shape": [1, *a.shape], "data": a.tolist()}
        for name, a in tensors.items()
    ]
    return json.dumps({"inputs": inputs}).encode()


def problem_of(data: bytes, header_length: int | None, **kwargs: object) -> problems.Problem:
    with pytest.raises(problems.Problem) as caught:
        decode(data, header_length, **kwargs)
    return caught.value


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 200),
    st.sampled_from([F16, F32]),
    st.lists(st.integers(0, 10**6), max_size=30),
    st.booleans(),
    st.sampled_from([0, 1 << 30]),
)
def test_any_chunking_decodes_to_the_arrays_sent(
    n: int, sent: np.dtype, cuts: list[int], declared: bool, stream_min: int
) -> None:
    """Streamed chunk by chunk or decoded whole by finish: the arrays, embeddings converted once."""
    tensors = arrays(n, sent, lod_dtype="uint8")
    data, length = binary(tensors)
    request = decode(data, length, cuts, stream_min, declared)
    snapshot = request.snapshot
    assert snapshot.embeddings.dtype == F32 and snapshot.sent_dtype == sent.name
    assert np.array_equal(snapshot.embeddings, tensors["embeddings"].astype(F32))
    assert snapshot.lod.dtype == np.uint8 and np.array_equal(snapshot.lod, tensors["lod"])
    assert np.array_equal(snapshot.positions, tensors["positions"])
    assert request.fields == {"parameters": {"binary_data_output": True}}


@pytest.mark.parametrize("sent", [F16, F32])
def test_json_tensors_equal_binary_ones(sent: np.dtype) -> None:
    tensors = arrays(7, sent)
    from_json = decode(as_json(tensors), None).snapshot
    from_binary = decode(*binary(tensors)).snapshot
    for name in codec.ARRAY_FIELDS:
        assert np.array_equal(getattr(from_json, name), getattr(from_binary, name))
    assert from_json.sent_dtype == sent.name


def test_nested_and_flat_json_data_are_the_same_tensor() -> None:
    tensors = arrays(3)
    flat = json.loads(as_json(tensors))
    for tensor in flat["inputs"]:
        tensor["data"] = np.asarray(tensor["data"]).reshape(-1).tolist()
    assert np.array_equal(
        decode(json.dumps(flat).encode(), None).snapshot.embeddings, decode(as_json(tensors), None).snapshot.embeddings
    )


def mutate_input(target: str, changes: dict[str, object]) -> bytes:
    document = json.loads(as_json(arrays(4)))
    for tensor in document["inputs"]:
        if tensor["name"] == target:
            tensor.update(changes)
    return json.dumps(document).encode()


INTEGERS = "INT8 | INT16 | INT32 | INT64 | UINT8 | UINT16 | UINT32"
KEYS = "['data', 'datatype', 'name', 'parameters', 'shape']"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "body: expected an $inference_request JSON object, got list"),
        (b'{"inputs": {}}', "inputs: expected a list of $request_input objects, got dict"),
        (mutate_input("lod", {"name": "level"}), "inputs[1].name: expected embeddings | lod | positions, got 'level'"),
        (mutate_input("lod", {"datatype": "FP64"}), f"lod.datatype: expected {INTEGERS}, got 'FP64'"),
        (
            mutate_input("lod", {"data": [0, 1.5, 0, 0]}),
            "lod.data: expected integers (INT64), got values of type float64",
        ),
        (
            mutate_input("lod", {"datatype": "INT8", "data": [0, 0, 0, 300]}),
            "lod.data: expected INT8 values in [-128, 127], got values outside",
        ),
        (mutate_input("lod", {"data": [0, 0, 0]}), "lod.data: expected 4 values (shape [1, 4]), got 3 values"),
        (mutate_input("lod", {"data": None}), "lod.data: expected a JSON array, got NoneType"),
        (
            mutate_input("embeddings", {"data": [["x"] * D] * 4}),
            "embeddings.data: expected a rectangular array of numbers, got a ragged or non-numeric array",
        ),
        (mutate_input("lod", {"extra": 1}), f"lod.extra: expected only the keys {KEYS}, got 'extra'"),
        (
            mutate_input("positions", {"shape": [4]}),
            "positions.shape: expected [1, N] (batch 1: one WC snapshot per request), got [4]",
        ),
        (b'{"inputs": []}', "embeddings: required"),
    ],
)
def test_defects_are_precise_422s(body: bytes, message: str) -> None:
    problem = problem_of(body, None)
    assert (problem.status, problem.detail) == (422, message)


def test_binary_sizes_must_match_the_shape_and_the_body() -> None:
    tensors = arrays(4)
    data, length = binary(tensors)
    head = json.loads(data[:length])
    head["inputs"][1]["parameters"]["binary_data_size"] = 31
    wrong = json.dumps(head).encode()
    problem = problem_of(wrong + data[length:], len(wrong))
    assert problem.detail == "lod.parameters.binary_data_size: expected 32 (INT64 [1, 4]) and no data, got 31"
    problem = problem_of(data + b"extra", length)  # bytes nobody claimed
    assert problem.status == 400 and problem.extensions["field"] == "binary_data_size"
    problem = problem_of(data[:length], None)  # inputs claim binary data, but no Inference-Header-Content-Length
    assert problem.status == 400 and problem.extensions["field"] == oip.HEADER_LENGTH
    problem = problem_of(data, None)  # binary data without that header: the body is not JSON
    assert problem.status == 400 and problem.extensions["field"] == "body"
    problem = problem_of(data[: length + 10], length, declared=False)  # the body ended early
    assert problem.status == 400 and problem.extensions["field"] == "embeddings"


def test_a_header_length_past_the_body_is_refused_before_reading() -> None:
    with pytest.raises(problems.Problem) as caught:
        oip.InferReader(D, 1000, F32, 100, 101, 0)
    assert caught.value.status == 400 and caught.value.extensions["field"] == oip.HEADER_LENGTH


def test_too_many_entries_is_413() -> None:
    data, length = binary(arrays(6))
    reader = oip.InferReader(D, 5, F32, len(data), length, 0)
    with pytest.raises(problems.Problem) as caught:
        reader.feed(data, more=False)
    assert caught.value.status == 413


@pytest.mark.parametrize("binary_output", [True, False])
def test_response_carries_scores_bit_for_bit(binary_output: bool) -> None:
    scores = np.random.default_rng(0).uniform(-1, 1, 9).astype(np.float32)
    body, length = oip.encode_response({"name": "m", "version": "1"}, "id-1", scores, binary_output)
    head = json.loads(body[:length] if binary_output else body)
    (output,) = head["outputs"]
    assert (head["model_name"], head["model_version"], head["id"]) == ("m", "1", "id-1")
    assert (output["name"], output["datatype"], output["shape"]) == ("scores", "FP32", [1, 9])
    if binary_output:
        assert output["parameters"] == {"binary_data_size": 36}
        decoded = np.frombuffer(body[length:], "<f4")
    else:
        assert length is None
        decoded = np.asarray(output["data"], dtype=np.float32)
    assert np.array_equal(decoded, scores)
