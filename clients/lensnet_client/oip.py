"""Open Inference Protocol (KServe v2) scoring requests with Triton's binary tensor data extension,
built with numpy alone (for load tests and tools that do not carry `tritonclient`).

    body, headers = oip.pack({"embeddings": e, "lod": lod, "positions": pos})
    httpx.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)

The body is the `$inference_request` JSON followed by each input's little-endian bytes, in input
order; `Inference-Header-Content-Length` gives the JSON's length. Each array gets the leading
batch axis of 1 that the service's v2 inputs have.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "int8": "INT8", "int16": "INT16", "int32": "INT32",
    "int64": "INT64", "float16": "FP16", "float32": "FP32",
}  # fmt: skip


def pack(
    arrays: dict[str, np.ndarray], *, binary_output: bool = True, request_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """One binary inference request for `arrays` (name → array without the batch axis) and its headers."""
    inputs, raw = [], []
    for name, array in arrays.items():
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        inputs.append({
            "name": name, "datatype": DATATYPES[little.dtype.name], "shape": [1, *little.shape],
            "parameters": {"binary_data_size": little.nbytes},
        })  # fmt: skip
        raw.append(little.tobytes())
    request: dict[str, Any] = {"inputs": inputs, "parameters": {"binary_data_output": binary_output}}
    if request_id is not None:
        request["id"] = request_id
    head = json.dumps(request, separators=(",", ":")).encode()
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return b"".join([head, *raw]), headers
