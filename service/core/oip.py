"""The Open Inference Protocol (KServe v2) wire format for scoring: request bodies → a snapshot,
scores → an inference response. Pure (numpy only); the routes are `service/http/v2.py`.

A request body is the `$inference_request` JSON object, optionally followed by raw tensor bytes
(Triton's binary tensor data extension: the `Inference-Header-Content-Length` header gives the
JSON's length; each input with a `binary_data_size` parameter has its little-endian bytes after
the JSON, in input order). The inputs are `embeddings` `[1, N, D]` (FP16 or FP32), `lod` and
`positions` `[1, N]` (INT8…INT64, UINT8…UINT32): batch 1, one WC snapshot per request. The reader
is a `FrameReader` with another header: binary inputs are placed (and converted) while the body
arrives, exactly like a frame's arrays, and the same checks (D, N, dtypes, sizes) apply.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from lensnet_client import frame

from . import codec, problems

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
OUTPUT = "scores"
DATATYPES = {
    "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "INT8": "int8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "FP16": "float16", "FP32": "float32",
}  # fmt: skip
V2_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
INPUT_DATATYPES = {name: tuple(V2_NAMES[dtype] for dtype in allowed) for name, allowed in codec.ALLOWED_DTYPES.items()}
INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})


def datatype(dtype: np.dtype) -> str:
    """The v2 name of a numpy dtype (FP32 for float32 …)."""
    return V2_NAMES[np.dtype(dtype).name]


class InferReader(codec.FrameReader):
    """An `$inference_request` body. With `header_length` (the binary extension) the JSON is that
    long and binary inputs follow; without it the whole body is JSON. A body of at least
    `stream_min_bytes` whose JSON is at most `codec.MAX_HEADER_BYTES` is decoded while it arrives;
    anything else whole, in the inference thread."""

    def __init__(
        self, embed_dim: int, max_entries: int, dtype: np.dtype, declared_length: int | None,
        header_length: int | None, stream_min_bytes: int,
    ) -> None:  # fmt: skip
        if header_length is not None and declared_length is not None and header_length > declared_length:
            raise problems.malformed(HEADER_LENGTH, f"at most the body's {declared_length} bytes", str(header_length))
        stream = (
            header_length is not None
            and header_length <= codec.MAX_HEADER_BYTES
            and (declared_length is None or declared_length >= stream_min_bytes)
        )
        super().__init__(embed_dim, max_entries, dtype, declared_length, stream, codec.SNAPSHOT)
        self.binary = header_length is not None
        self.length = self.start = header_length

    def finish(self) -> codec.DecodedRequest:
        if self.length is None:  # no binary data: the JSON object is the whole body
            self.length = self.start = sum(len(chunk) for chunk in self.held)
        return super().finish()

    def _truncated_head(self) -> None:
        got = f"a body of {self.declared_length if self.declared_length is not None else len(self.head)} bytes"
        raise problems.malformed(HEADER_LENGTH, f"a {self.length}-byte JSON object inside the body", got)

    def _describe(self) -> None:
        """The request's inputs: binary ones become `specs` (offsets in input order), JSON ones
        `inline` arrays; everything else (id, parameters, outputs) stays in `fields`."""
        try:
            request = json.loads(bytes(self.head[: self.length]))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge int literals, deep nesting
            raise problems.malformed("body", "an $inference_request JSON object", f"invalid JSON ({exc})") from exc
        if not isinstance(request, dict):
            raise problems.invalid("body", "an $inference_request JSON object", type(request).__name__)
        inputs = request.pop("inputs", None)
        if not isinstance(inputs, list):
            raise problems.invalid("inputs", "a list of $request_input objects", type(inputs).__name__)
        offset, shapes = 0, {}
        for k, tensor in enumerate(inputs):
            name, dtype, shape, size = self._input(k, tensor, shapes)
            shapes[name] = shape
            if size is None:
                self.inline[name] = _tensor_data(tensor.get("data"), name, dtype, shape)
            else:
                self.specs[name] = frame.ArraySpec(dtype, tuple(shape[1:]), offset, size)
                offset += size
        _check_batch(shapes, self.embed_dim)
        if self.specs and not self.binary:
            expected = "the JSON object's length (inputs carry binary_data_size)"
            raise problems.malformed(HEADER_LENGTH, expected, "nothing")
        if self.binary and self.declared_length is not None and self.declared_length - self.start != offset:
            detail = f"{self.declared_length - self.start} bytes after the JSON object"
            raise problems.malformed("binary_data_size", f"sizes adding up to the {detail}", f"{offset} bytes")
        self.fields = request

    def _input(self, k: int, tensor: Any, seen: dict[str, list[int]]) -> tuple[str, np.dtype, list[int], int | None]:
        """One `$request_input` checked: (name, dtype, shape, binary_data_size or None)."""
        if not isinstance(tensor, dict):
            raise problems.invalid(f"inputs[{k}]", "a $request_input object", type(tensor).__name__)
        name = tensor.get("name")
        if name not in codec.ARRAY_FIELDS:
            raise problems.invalid(f"inputs[{k}].name", " | ".join(codec.ARRAY_FIELDS), repr(name))
        if name in seen:
            raise problems.invalid(f"inputs[{k}].name", "each input once", f"a second {name!r}")
        if unknown := sorted(set(tensor) - INPUT_KEYS):
            raise problems.invalid(f"{name}.{unknown[0]}", f"only the keys {sorted(INPUT_KEYS)}", repr(unknown[0]))
        kind = tensor.get("datatype")
        if kind not in INPUT_DATATYPES[name]:
            raise problems.invalid(f"{name}.datatype", " | ".join(INPUT_DATATYPES[name]), repr(kind))
        shape = tensor.get("shape")
        rank = 3 if name == "embeddings" else 2
        if not frame.is_shape(shape) or len(shape) != rank or shape[0] != 1:
            expected = "[1, N, D]" if rank == 3 else "[1, N]"
            raise problems.invalid(f"{name}.shape", f"{expected} (batch 1: one WC snapshot per request)", repr(shape))
        dtype = np.dtype(DATATYPES[kind]).newbyteorder("<")
        parameters = tensor.get("parameters", {})
        if not isinstance(parameters, dict) or set(parameters) - {"binary_data_size"}:
            raise problems.invalid(f"{name}.parameters", "at most {binary_data_size}", repr(parameters)[:80])
        size = parameters.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise problems.invalid(f"{name}.data", "the tensor's data or a binary_data_size parameter", "neither")
            return name, dtype, shape, None
        expected_size = math.prod(shape) * dtype.itemsize
        if "data" in tensor or not isinstance(size, int) or isinstance(size, bool) or size != expected_size:
            got = "data as well" if "data" in tensor else repr(size)
            field = f"{name}.parameters.binary_data_size"
            raise problems.invalid(field, f"{expected_size} ({kind} {shape}) and no data", got)
        return name, dtype, shape, size


def _check_batch(shapes: dict[str, list[int]], embed_dim: int) -> None:
    """D and N in the request's own terms ([1, N, D] / [1, N]); the rest is `codec`'s check."""
    if "embeddings" not in shapes:
        return  # reported as missing by the shared check
    _, n, d = shapes["embeddings"]
    if d != embed_dim:
        raise problems.invalid("embeddings.shape", f"[1, N, {embed_dim}]", str(shapes["embeddings"]))
    for name in ("lod", "positions"):
        if name in shapes and shapes[name] != [1, n]:
            raise problems.invalid(f"{name}.shape", f"[1, {n}] (one per embedding)", str(shapes[name]))


def _tensor_data(value: Any, name: str, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """JSON tensor data (nested or flat, row-major) as `dtype`, without its batch axis; integers
    must be integers within the datatype's range (nothing is silently truncated or wrapped)."""
    field = f"{name}.data"
    if not isinstance(value, list):
        raise problems.invalid(field, "a JSON array", type(value).__name__)
    try:
        array = np.asarray(value, dtype=np.float64) if dtype.kind == "f" else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise problems.invalid(field, "a rectangular array of numbers", "a ragged or non-numeric array") from exc
    if array.size != math.prod(shape):
        raise problems.invalid(field, f"{math.prod(shape)} values (shape {shape})", f"{array.size} values")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.dtype.kind not in "iu":
            raise problems.invalid(field, f"integers ({datatype(dtype)})", f"values of type {array.dtype}")
        if array.min() < info.min or array.max() > info.max:
            raise problems.invalid(field, f"{datatype(dtype)} values in [{info.min}, {info.max}]", "values outside")
    return array.astype(dtype.newbyteorder("=")).reshape(shape[1:])


def encode_response(
    model: dict[str, str], request_id: str | None, scores: np.ndarray, binary: bool
) -> tuple[bytes, int | None]:
    """The `$inference_response` with the `scores` output `[1, N]` FP32, as JSON numbers or as
    binary data after the JSON; returns the body and, when binary, the JSON's length."""
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": [1, int(scores.size)]}
    little = np.ascontiguousarray(scores, dtype="<f4")
    if binary:
        output["parameters"] = {"binary_data_size": little.nbytes}
    else:
        output["data"] = little.tolist()
    document: dict[str, Any] = {"model_name": model["name"], "model_version": model["version"]}
    if request_id is not None:
        document["id"] = request_id
    head = json.dumps(document | {"outputs": [output]}, separators=(",", ":")).encode()
    return (head + little.tobytes(), len(head)) if binary else (head, None)
