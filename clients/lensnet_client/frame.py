"""The binary wire format: a small JSON header followed by raw little-endian array bytes.

Modelled on the KServe v2 / Triton binary tensor extension (JSON header + raw tensor data), in a
self-contained body that needs nothing beyond numpy to read or write:

    bytes 0-3   magic b"LNF1"
    bytes 4-7   header length H, uint32 little-endian
    bytes 8-    H bytes of UTF-8 JSON: any fields, plus "arrays": {name: {"dtype", "shape",
                "offset", "nbytes"}} with offsets relative to the payload start
    payload     starts at the first multiple of 64 after the header; each array starts on a
                multiple of 64 within it

Decoding is zero-copy (`np.frombuffer` views) and never parses numbers, so an 8 MB fp16
embedding matrix costs no more than reading it off the socket.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, NamedTuple

import numpy as np

MEDIA_TYPE = "application/vnd.lensnet.frame"
MAGIC = b"LNF1"
ALIGN = 64
DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"})
_PREFIX = struct.Struct("<4sI")


MAX_DIMS = 8


def is_shape(shape: Any) -> bool:
    """A JSON value usable as an array shape: a short list of non-negative ints."""
    return (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    )


class FrameError(ValueError):
    """A body is not a well-formed frame: `field` names the offending part, `expected` what it
    should be, `got` what it is."""

    def __init__(self, field: str, expected: str, got: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field, self.expected, self.got = field, expected, got


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def pack(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """One frame holding `header` (JSON-serialisable) and `arrays` (any numeric dtype in DTYPES)."""
    descriptors, offset = {}, 0
    contiguous = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        if array.dtype.name not in DTYPES:
            raise FrameError(name, f"a dtype in {sorted(DTYPES)}", f"dtype {array.dtype}")
        contiguous[name] = array
        descriptors[name] = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "offset": offset,
            "nbytes": array.nbytes,
        }
        offset = _align(offset + array.nbytes)
    head = json.dumps({**header, "arrays": descriptors}, separators=(",", ":")).encode()
    start = _align(_PREFIX.size + len(head))
    body = bytearray(start + offset)
    body[: _PREFIX.size + len(head)] = _PREFIX.pack(MAGIC, len(head)) + head
    view = memoryview(body)
    for name, array in contiguous.items():
        at = start + descriptors[name]["offset"]
        view[at : at + array.nbytes] = array.reshape(-1).view(np.uint8)
    return bytes(body)


class ArraySpec(NamedTuple):
    """One array's descriptor from a frame header, checked: where its bytes are and what they hold."""

    dtype: np.dtype  # little-endian
    shape: tuple[int, ...]
    offset: int  # from the payload start
    nbytes: int


def header_length(prefix: bytes | bytearray | memoryview) -> int:
    """H, from the frame's first 8 bytes (magic and header length); `FrameError` on bad magic."""
    magic, length = _PREFIX.unpack_from(prefix)
    if magic != MAGIC:
        raise FrameError("frame", f"magic {MAGIC!r}", repr(bytes(magic)))
    return int(length)


def payload_start(length: int) -> int:
    """Where the payload begins for a header of `length` bytes."""
    return _align(_PREFIX.size + length)


def parse_header(raw: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header's JSON: (fields without "arrays", the raw array descriptors by name)."""
    try:
        header = json.loads(bytes(raw))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge int literals, deep nesting
        raise FrameError("frame", "a JSON header", f"invalid JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("arrays", {}), dict):
        kind = type(header).__name__ if not isinstance(header, dict) else type(header["arrays"]).__name__
        got = kind if not isinstance(header, dict) else f"'arrays' of type {kind}"
        raise FrameError("frame", "a JSON object header whose 'arrays' is an object", got)
    return header, header.pop("arrays", {})


def array_spec(name: str, spec: Any) -> ArraySpec:
    """A checked descriptor: a known dtype, a sane shape, and `nbytes` matching them."""
    if not isinstance(spec, dict):
        raise FrameError(name, "an array descriptor object", type(spec).__name__)
    dtype, shape, offset, nbytes = (spec.get(k) for k in ("dtype", "shape", "offset", "nbytes"))
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FrameError(f"{name}.dtype", f"one of {sorted(DTYPES)}", repr(dtype))
    if not is_shape(shape):
        raise FrameError(f"{name}.shape", f"a list of at most {MAX_DIMS} non-negative integers", repr(shape))
    for key, value in (("offset", offset), ("nbytes", nbytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FrameError(f"{name}.{key}", "a non-negative integer", repr(value))
    item = np.dtype(dtype).newbyteorder("<")
    count = math.prod(shape)  # Python ints: no overflow, however large the claimed shape
    if nbytes != count * item.itemsize:
        raise FrameError(f"{name}.nbytes", f"{count * item.itemsize} ({dtype} {shape})", str(nbytes))
    return ArraySpec(item, tuple(shape), offset, nbytes)


def beyond(name: str, spec: ArraySpec, payload: int) -> FrameError:
    """The error for an array whose bytes run past the end of a `payload`-byte payload."""
    return FrameError(
        name, f"its bytes {spec.offset}…{spec.offset + spec.nbytes} inside the payload", f"{payload} payload bytes"
    )


def unpack(body: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header (without "arrays") and zero-copy array views; `FrameError` on any defect."""
    if len(body) < _PREFIX.size:
        raise FrameError("frame", f"at least {_PREFIX.size} bytes", f"{len(body)} bytes")
    length = header_length(body)
    if _PREFIX.size + length > len(body):
        raise FrameError("frame", f"a {length}-byte header inside the body", f"a body of {len(body)} bytes")
    header, descriptors = parse_header(memoryview(body)[_PREFIX.size : _PREFIX.size + length])
    start = payload_start(length)
    arrays = {}
    for name, raw in descriptors.items():
        spec = array_spec(name, raw)
        if start + spec.offset + spec.nbytes > len(body):
            raise beyond(name, spec, max(0, len(body) - start))
        count = spec.nbytes // spec.dtype.itemsize
        view = np.frombuffer(body, dtype=spec.dtype, count=count, offset=start + spec.offset)
        arrays[name] = view.reshape(spec.shape)
    return header, arrays
