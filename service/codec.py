"""Wire codecs: request bodies → a typed snapshot, results → response bodies. Pure functions.

Two request formats, chosen by `Content-Type`:
- `application/json`: arrays as nested lists (small requests) or as
  `{"dtype", "shape", "data": base64 of little-endian bytes}`;
- `application/vnd.lensnet.frame` (`lensnet_client.frame`): a JSON header + raw array bytes,
  decoded without copies or number parsing — the production format.
Responses use the request's format unless `Accept` asks for the other one.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lensnet_client import frame

from . import problems

JSON = "application/json"
FRAME = frame.MEDIA_TYPE
MEDIA_TYPES = (JSON, FRAME)
EMBEDDING_DTYPES = ("float16", "float32")
INDEX_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
ARRAY_FIELDS = ("embeddings", "lod", "positions")

ArrayStyle = Literal["list", "base64", "frame"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    embeddings: np.ndarray  # [N, D], float16 or float32, as received
    lod: np.ndarray  # [N], integer
    positions: np.ndarray  # [N], integer


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    snapshot: Snapshot
    fields: dict[str, Any]  # everything besides the arrays (options, history, …), validated later
    style: ArrayStyle  # how arrays came in, so they go back out the same way


def request_media_type(content_type: str | None) -> str:
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise problems.Problem(
            415, "unsupported-media-type", "Unsupported media type",
            f"Content-Type: expected {JSON} or {FRAME}, got {content_type or 'nothing'}",
            field="Content-Type", expected=f"{JSON} | {FRAME}", got=content_type or "",
        )  # fmt: skip
    return media


def response_media_type(accept: str | None, request_media: str) -> str:
    """The first of our media types that `Accept` lists (q=0 excluded; other weights are not
    ranked); the request's type for */* or no Accept."""
    if not accept:
        return request_media
    for item in accept.split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if any(param.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for param in params):
            continue  # explicitly not acceptable
        if media in MEDIA_TYPES:
            return media
        if media in ("*/*", "application/*"):
            return request_media
    raise problems.Problem(
        406, "not-acceptable", "Not acceptable", f"Accept: this service answers {JSON} or {FRAME}, got {accept}",
        field="Accept", expected=f"{JSON} | {FRAME}", got=accept,
    )  # fmt: skip


def decode_request(body: bytes | bytearray, media_type: str, embed_dim: int, max_entries: int) -> DecodedRequest:
    """Parse a body and check the snapshot's arrays (dtypes, shapes, D, N limits).

    Raises `Problem`: 400 unparseable, 413 too many entries, 422 wrong arrays.
    """
    if media_type == FRAME:
        try:
            fields, arrays = frame.unpack(body)
        except frame.FrameError as exc:
            raise problems.malformed(exc.field, str(exc)) from exc
        if unknown := sorted(set(arrays) - set(ARRAY_FIELDS)):
            raise problems.invalid(unknown[0], f"only the arrays {list(ARRAY_FIELDS)}", f"an array {unknown[0]!r}")
        style: ArrayStyle = "frame"
    else:
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge int literals, deep nesting
            raise problems.malformed("body", f"body: not valid JSON ({exc})") from exc
        if not isinstance(fields, dict):
            raise problems.invalid("body", "a JSON object", type(fields).__name__)
        style = "base64" if isinstance(fields.get("embeddings"), dict) else "list"
        arrays = {name: _json_array(fields[name], name) for name in ARRAY_FIELDS if name in fields}
        for name in ARRAY_FIELDS:
            fields.pop(name, None)
    return DecodedRequest(_snapshot(arrays, embed_dim, max_entries), fields, style)


def _json_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, dict):
        return _base64_array(value, name)
    if not isinstance(value, list):
        raise problems.invalid(name, "a list or a {dtype, shape, data} object", type(value).__name__)
    try:
        array = np.asarray(value, dtype=np.float32) if name == "embeddings" else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise problems.invalid(
            name, "a rectangular array of numbers", "a ragged or non-numeric list", str(exc)
        ) from exc
    if name == "embeddings":
        return array
    if not array.size:
        return array.astype(np.int64)  # json [] has no dtype; let the shape check speak
    if array.dtype.kind not in "iu":
        raise problems.invalid(name, "integers", f"values of type {array.dtype}")
    return array


def _base64_array(value: dict[str, Any], name: str) -> np.ndarray:
    unknown = set(value) - {"dtype", "shape", "data"}
    if unknown or not {"dtype", "shape", "data"} <= set(value):
        raise problems.invalid(name, "keys dtype, shape, data", f"keys {sorted(value)}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    allowed = EMBEDDING_DTYPES if name == "embeddings" else INDEX_DTYPES
    if dtype not in allowed:
        raise problems.invalid(f"{name}.dtype", " | ".join(allowed), repr(dtype))
    if not frame.is_shape(shape):
        raise problems.invalid(
            f"{name}.shape", f"a list of at most {frame.MAX_DIMS} non-negative integers", repr(shape)
        )
    if not isinstance(data, str):
        raise problems.invalid(f"{name}.data", "a base64 string", type(data).__name__)
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise problems.invalid(
            f"{name}.data", "base64", "invalid base64", f"{name}.data: not valid base64 ({exc})"
        ) from exc
    item = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * item.itemsize
    if len(raw) != expected:
        raise problems.invalid(f"{name}.data", f"{expected} bytes ({dtype} {shape})", f"{len(raw)} bytes")
    return np.frombuffer(raw, dtype=item).reshape(shape)


def _snapshot(arrays: dict[str, np.ndarray], embed_dim: int, max_entries: int) -> Snapshot:
    for name in ARRAY_FIELDS:
        if name not in arrays:
            raise problems.invalid(name, "an array", "nothing", f"{name}: required")
    embeddings, lod, positions = (arrays[name] for name in ARRAY_FIELDS)
    if embeddings.dtype.name not in EMBEDDING_DTYPES:
        raise problems.invalid("embeddings.dtype", " | ".join(EMBEDDING_DTYPES), embeddings.dtype.name)
    if embeddings.ndim != 2 or embeddings.shape[1] != embed_dim:
        raise problems.invalid("embeddings.shape", f"[N, {embed_dim}]", str(list(embeddings.shape)))
    n = embeddings.shape[0]
    if n < 1:
        raise problems.invalid("embeddings.shape", "at least 1 entry", "0 entries")
    if n > max_entries:
        raise problems.too_large("embeddings.shape", f"{max_entries} entries", f"{n} entries")
    for name, array in (("lod", lod), ("positions", positions)):
        if array.dtype.name not in INDEX_DTYPES:
            raise problems.invalid(f"{name}.dtype", " | ".join(INDEX_DTYPES), array.dtype.name)
        if array.shape != (n,):
            raise problems.invalid(f"{name}.shape", f"[{n}] (one per embedding)", str(list(array.shape)))
    return Snapshot(embeddings, lod, positions)


def encode_response(
    document: dict[str, Any], arrays: dict[str, np.ndarray], media_type: str, style: ArrayStyle
) -> bytes:
    """`document` plus `arrays` in the response format: a frame, or JSON with arrays as lists or
    base64 objects (mirroring the request)."""
    if media_type == FRAME:
        return frame.pack(document, arrays)
    for name, array in arrays.items():
        if style == "base64":
            data = base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode()
            document[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}
        else:
            document[name] = array.tolist()
    return json.dumps(document, separators=(",", ":")).encode()
