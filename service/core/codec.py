"""Wire codecs: request bodies → a typed snapshot, results → response bodies.

Two request formats, chosen by `Content-Type`:
- `application/json`: arrays as nested lists (small requests) or as
  `{"dtype", "shape", "data": base64 of little-endian bytes}`;
- `application/vnd.lensnet.frame` (`lensnet_client.frame`): a JSON header + raw array bytes,
  the production format, decoded while it arrives (`FrameReader`).
Embeddings come out in the graph's dtype (float16 ⇄ float32 converted once, by `service.core._bulk`).
Responses use the request's format unless `Accept` asks for the other one.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from lensnet_client import frame

from . import _bulk, problems

JSON = "application/json"
FRAME = frame.MEDIA_TYPE
MEDIA_TYPES = (JSON, FRAME)
EMBEDDING_DTYPES = ("float16", "float32")
INDEX_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
ARRAY_FIELDS = ("embeddings", "lod", "positions")
DELTA_FIELDS = ("created", "append_embeddings", "append_lod", "append_positions")  # a session step's arrays
MAX_HEADER_BYTES = 1 << 20  # a frame's JSON header: options and up to 1,024 history entries fit in ~100 kB
ALLOWED_DTYPES = {
    "embeddings": EMBEDDING_DTYPES, "lod": INDEX_DTYPES, "positions": INDEX_DTYPES,
    "created": EMBEDDING_DTYPES, "append_embeddings": EMBEDDING_DTYPES,
    "append_lod": INDEX_DTYPES, "append_positions": INDEX_DTYPES,
}  # fmt: skip
_CONVERT = {("float16", "float32"): _bulk.half_to_float, ("float32", "float16"): _bulk.float_to_half}

ArrayStyle = Literal["list", "base64", "frame"]


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name`, remembered: numpy computes it in Python (~13 µs a call here), and a small
    frame's decode asks for it a dozen times."""
    return dtype.name


@dataclass(frozen=True, slots=True)
class Snapshot:
    embeddings: np.ndarray  # [N, D] in the graph's dtype
    lod: np.ndarray  # [N], integer
    positions: np.ndarray  # [N], integer
    sent_dtype: str  # the embeddings' dtype on the wire (float64 for JSON lists: JSON numbers)


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    arrays: dict[str, np.ndarray]  # float arrays in the graph's dtype
    sent: dict[str, str]  # each array's dtype on the wire (float32 for JSON lists)
    fields: dict[str, Any]  # everything besides the arrays (options, history, …), validated later
    style: ArrayStyle  # how arrays came in, so they go back out the same way

    @property
    def snapshot(self) -> Snapshot:
        embeddings, lod, positions = (self.arrays[name] for name in ARRAY_FIELDS)
        return Snapshot(embeddings, lod, positions, self.sent["embeddings"])


ArrayCheck = Callable[[dict[str, tuple[np.dtype, tuple[int, ...]]], int, int], None]


@dataclass(frozen=True, slots=True)
class Schema:
    """The arrays a body may carry: their names, which are float rows [n, D] (converted to the
    graph's dtype), and the check of their (dtype, shape)s against D and the N limit."""

    arrays: tuple[str, ...]
    floats: tuple[str, ...]
    check: ArrayCheck


class BodyReader(Protocol):
    """A request body, fed chunk by chunk as it arrives and closed at its end (on the event loop:
    cheap per chunk), then decoded by `finish` (in the inference thread, where the remaining work
    happens). `more`: whether more of the body is still to come."""

    def feed(self, chunk: bytes, more: bool) -> None: ...

    def close(self) -> None:
        """The body ended: refuse (Problem) what is already known to be incomplete."""

    def finish(self) -> DecodedRequest: ...


def reader(
    media_type: str, embed_dim: int, max_entries: int, dtype: np.dtype, declared_length: int | None,
    stream_min_bytes: int, schema: Schema | None = None,
) -> BodyReader:  # fmt: skip
    """The reader for a body of `media_type` (a snapshot, or what `schema` says) whose embeddings
    the graph wants as `dtype`; a frame of at least `stream_min_bytes` (or of unknown length) is
    decoded while it arrives."""
    schema = schema or SNAPSHOT
    if media_type == FRAME:
        stream = declared_length is None or declared_length >= stream_min_bytes
        return FrameReader(embed_dim, max_entries, dtype, declared_length, stream, schema)
    return JsonReader(embed_dim, max_entries, dtype, schema)


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


class JsonReader:
    """JSON bodies are parsed whole: chunks are kept until `finish`."""

    def __init__(self, embed_dim: int, max_entries: int, dtype: np.dtype, schema: Schema) -> None:
        self.embed_dim, self.max_entries, self.dtype, self.schema = embed_dim, max_entries, dtype, schema
        self.chunks: list[bytes] = []

    def feed(self, chunk: bytes, more: bool) -> None:
        self.chunks.append(chunk)

    def close(self) -> None:
        pass  # JSON is only checked when parsed

    def finish(self) -> DecodedRequest:
        """Raises `Problem`: 400 unparseable, 413 too many entries, 422 wrong arrays."""
        try:
            fields = json.loads(b"".join(self.chunks))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge int literals, deep nesting
            raise problems.malformed("body", "a JSON object", f"invalid JSON ({exc})") from exc
        if not isinstance(fields, dict):
            raise problems.invalid("body", "a JSON object", _json_kind(fields))
        floats = self.schema.floats
        style: ArrayStyle = "base64" if any(isinstance(fields.get(name), dict) for name in floats) else "list"
        listed = {name for name in self.schema.arrays if isinstance(fields.get(name), list)}
        arrays = {
            name: _json_array(fields.pop(name), name, name in floats) for name in self.schema.arrays if name in fields
        }
        for name in floats:  # `[]`: no rows
            if name in arrays and arrays[name].shape == (0,):
                arrays[name] = arrays[name].reshape(0, self.embed_dim)
        self.schema.check({name: (array.dtype, array.shape) for name, array in arrays.items()}, self.embed_dim,
                          self.max_entries)  # fmt: skip
        # JSON numbers are float64 on the wire, converted to float32 on reading.
        sent = {
            name: "float64" if name in listed and name in floats else dtype_name(a.dtype) for name, a in arrays.items()
        }
        converted = {name: convert(array, self.dtype) if name in floats else array for name, array in arrays.items()}
        return DecodedRequest(converted, sent, fields, style)


class FrameReader:
    """A frame decoded as it arrives: the header as soon as it is complete (bad arrays are refused
    before the rest of the body is read), then each array's bytes straight into its final buffer,
    the embeddings converted to the graph's dtype on the way, while more of the body is still to
    come (the work hides in the transfer). Bytes in hand when the body ends, and all of a body
    not `stream`ed (a small one arrives faster than it decodes: nothing to hide the work behind),
    are placed by `finish`, in the inference thread rather than on the event loop. No whole-body
    copy, no separate conversion pass."""

    def __init__(
        self, embed_dim: int, max_entries: int, dtype: np.dtype, declared_length: int | None, stream: bool,
        schema: Schema,
    ) -> None:  # fmt: skip
        self.embed_dim, self.max_entries, self.dtype, self.schema = embed_dim, max_entries, dtype, schema
        self.declared_length = declared_length
        self.head = bytearray()  # prefix, header and padding, until the payload starts
        self.length: int | None = None  # of the JSON header
        self.start = 0  # payload offset in the body, once `length` is known
        self.received = 0  # payload bytes placed so far
        self.held: list[memoryview] = []  # payload bytes for `finish` to place, in order
        self.held_bytes = 0
        self.stream = stream
        self.fields: dict[str, Any] = {}
        self.specs: dict[str, frame.ArraySpec] = {}  # arrays in the payload
        self.inline: dict[str, np.ndarray] = {}  # arrays given in the header itself
        self.sinks: dict[str, _Sink] = {}
        self.planned = False  # the header is read and its arrays allocated
        self.regions: list[tuple[int, int, _Sink]] = []  # (start, end, sink) in the payload, by start

    def feed(self, chunk: bytes, more: bool) -> None:
        data = memoryview(chunk)
        if not self.stream:
            self.held.append(data)
            return
        if not self.planned:
            data = self._read_head(data)
        if more and not self.held:
            self._place(data)
        elif data:
            self.held.append(data)
            self.held_bytes += len(data)

    def close(self) -> None:
        if self.stream:
            self._check_complete()

    def finish(self) -> DecodedRequest:
        if not self.stream:  # the whole body is in hand: read it here, off the event loop
            chunks, self.held, self.stream = self.held, [], True
            for chunk in chunks:
                self.feed(chunk, more=False)
        self._check_complete()
        for data in self.held:
            self._place(data)
        arrays = {name: sink.array for name, sink in self.sinks.items()}
        sent = {name: dtype_name(spec.dtype) for name, spec in self.specs.items()}
        sent |= {name: dtype_name(array.dtype) for name, array in self.inline.items()}
        return DecodedRequest(arrays, sent, self.fields, "frame")

    def _check_complete(self) -> None:
        if not self.planned:
            self._truncated_head()
        payload = self.received + self.held_bytes
        for name, spec in self.specs.items():
            if payload < spec.offset + spec.nbytes:
                raise _malformed(frame.beyond(name, spec, payload))

    def _place(self, data: memoryview) -> None:
        """Payload bytes, in order, to the arrays they belong to (regions by start; those already
        complete are skipped for good)."""
        first, last = self.received, self.received + len(data)
        while self.regions and self.regions[0][1] <= first:
            self.regions.pop(0)
        for start, end, sink in self.regions:
            if start >= last:
                break
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                sink.write(data[lo - first : hi - first])
        self.received = last

    def _read_head(self, data: memoryview) -> memoryview:
        """Take header bytes from `data`; once the header is complete, plan the arrays. Returns the rest."""
        while not self.planned:
            want = 8 if self.length is None else self.start
            take = min(want - len(self.head), len(data))
            self.head += data[:take]
            data = data[take:]
            if len(self.head) < want:
                return data
            if self.length is None:
                try:
                    self.length = frame.header_length(self.head)
                except frame.FrameError as exc:
                    raise _malformed(exc) from exc
                if self.length > MAX_HEADER_BYTES:  # it is parsed on the event loop
                    raise problems.too_large("frame.header", f"{MAX_HEADER_BYTES} bytes", f"{self.length} bytes")
                self.start = frame.payload_start(self.length)
                if self.declared_length is not None and self.start > self.declared_length:
                    self._truncated_head()
            else:
                self._plan()
        return data

    def _truncated_head(self) -> None:
        got = f"a body of {self.declared_length if self.declared_length is not None else len(self.head)} bytes"
        if self.length is None:
            raise problems.malformed("frame", "at least 8 bytes", got)
        raise problems.malformed("frame", f"a {self.length}-byte header inside the body", got)

    def _describe(self) -> None:
        """Parse the complete header into `fields`, the `specs` of the arrays in the payload and any
        `inline` arrays (none in a frame), checking what each array may hold."""
        try:
            self.fields, descriptors = frame.parse_header(memoryview(self.head)[8 : 8 + self.length])
        except frame.FrameError as exc:
            raise _malformed(exc) from exc
        if unknown := sorted(set(descriptors) - set(self.schema.arrays)):
            expected = f"only the arrays {list(self.schema.arrays)}"
            raise problems.invalid(unknown[0], expected, f"an array {unknown[0]!r}")
        for name, raw in descriptors.items():
            if isinstance(raw, dict) and raw.get("dtype") not in ALLOWED_DTYPES[name]:
                raise problems.invalid(f"{name}.dtype", " | ".join(ALLOWED_DTYPES[name]), repr(raw.get("dtype")))
            try:
                self.specs[name] = frame.array_spec(name, raw)
            except frame.FrameError as exc:
                raise _malformed(exc) from exc

    def _plan(self) -> None:
        """Check the header's arrays (what each may hold, the shapes, D, N) and allocate their buffers."""
        self._describe()
        arrays = {name: (spec.dtype, spec.shape) for name, spec in self.specs.items()}
        self.schema.check(arrays | {name: (a.dtype, a.shape) for name, a in self.inline.items()}, self.embed_dim,
                          self.max_entries)  # fmt: skip
        if self.declared_length is not None:  # before allocating for a header that lies
            payload = self.declared_length - self.start
            for name, spec in self.specs.items():
                if spec.offset + spec.nbytes > payload:
                    raise _malformed(frame.beyond(name, spec, payload))
        for name, spec in self.specs.items():
            target = self.dtype if name in self.schema.floats else spec.dtype
            self.sinks[name] = _Sink(spec, np.empty(spec.shape, dtype=target))
        for name, array in self.inline.items():
            self.sinks[name] = _Sink.holding(convert(array, self.dtype) if name in self.schema.floats else array)
        spans = ((spec.offset, spec.offset + spec.nbytes, self.sinks[name]) for name, spec in self.specs.items())
        self.regions = sorted(spans, key=lambda region: region[:2])
        self.planned = True


class _Sink:
    """Bytes of one array in arrival order, into its buffer: copied, or converted element by
    element when the buffer's dtype differs (an element split across chunks waits for the rest)."""

    def __init__(self, spec: frame.ArraySpec, array: np.ndarray) -> None:
        self.array, self.size = array, spec.dtype.itemsize
        self.kernel = _CONVERT.get((dtype_name(spec.dtype), dtype_name(array.dtype)))
        self.bytes = memoryview(array.reshape(-1)).cast("B")
        self.done = 0  # bytes (copy) or items (convert) written
        self.partial = bytearray()

    @classmethod
    def holding(cls, array: np.ndarray) -> _Sink:
        """A sink already full: an array that came inline, not in the payload."""
        array = np.ascontiguousarray(array)
        return cls(frame.ArraySpec(array.dtype, array.shape, 0, array.nbytes), array)

    def write(self, data: memoryview) -> None:
        if self.kernel is None:
            self.bytes[self.done : self.done + len(data)] = data
            self.done += len(data)
            return
        if self.partial:
            take = min(self.size - len(self.partial), len(data))
            self.partial += data[:take]
            data = data[take:]
            if len(self.partial) < self.size:
                return
            self.kernel(self.partial, self.array, self.done)
            self.done += 1
            self.partial.clear()
        whole = len(data) - len(data) % self.size
        if whole:
            self.kernel(data[:whole], self.array, self.done)
            self.done += whole // self.size
        self.partial += data[whole:]


def convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` (float16 or float32) in `dtype`, converted at most once."""
    if array.dtype == dtype:
        return array
    out = np.empty(array.shape, dtype=dtype)
    _CONVERT[dtype_name(array.dtype), dtype_name(dtype)](np.ascontiguousarray(array), out)
    return out


def _malformed(error: frame.FrameError) -> problems.Problem:
    return problems.malformed(error.field, error.expected, error.got)


def _json_array(value: Any, name: str, floats: bool) -> np.ndarray:
    """A JSON list as an array: float rows (`floats`) as float32 (numbers beyond its range become
    inf, refused later with the other non-finite values), index arrays as 64-bit integers. Anything
    else (strings, booleans, null, integers beyond 64 bits in an index array) is a 422, never a crash."""
    if isinstance(value, dict):
        return _base64_array(value, name)
    if not isinstance(value, list):
        raise problems.invalid(name, "a list or a {dtype, shape, data} object", _json_kind(value))
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise problems.invalid(
            name, "a rectangular array of numbers", "a ragged or non-numeric list", str(exc)
        ) from exc
    if not array.size:
        return array.astype(np.float32 if floats else np.int64)  # [] has no dtype; the shape check speaks
    if floats:
        if array.dtype.kind == "O":  # integers beyond 64 bits, or null among the numbers
            array = _wide_floats(array, name)
        if array.dtype.kind not in "iuf":
            raise problems.invalid(name, "numbers", _element_kind(array))
        with np.errstate(over="ignore"):  # beyond float32: inf, refused as non-finite
            return array.astype(np.float32)
    if array.dtype.kind not in "iu":
        raise problems.invalid(name, "integers", _element_kind(array))
    return array


def _wide_floats(array: np.ndarray, name: str) -> np.ndarray:
    """An object array from JSON (only integers too wide for 64 bits make one, or null/mixed
    values) as float64; an integer beyond float64 is as out of range as inf, so it becomes inf."""
    out = np.empty(array.shape, dtype=np.float64)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1).tolist()):
        if type(item) not in (int, float):
            row = int(np.unravel_index(i, array.shape)[0])
            raise problems.invalid(f"{name}[{row}]", "numbers", _json_kind(item), index=row)
        try:
            flat[i] = float(item)
        except OverflowError:
            flat[i] = math.inf
    return out


def _element_kind(array: np.ndarray) -> str:
    """What a non-numeric JSON array holds, in JSON's words."""
    if array.dtype.kind == "O":
        return "integers beyond 64 bits or non-numbers"
    return {"U": "strings", "b": "booleans", "f": "non-integer numbers"}.get(array.dtype.kind, f"{array.dtype} values")


def _json_kind(item: Any) -> str:
    names = {str: "a string", bool: "a boolean", type(None): "null", list: "a list", dict: "an object"}
    return names.get(type(item), type(item).__name__)


def _base64_array(value: dict[str, Any], name: str) -> np.ndarray:
    unknown = set(value) - {"dtype", "shape", "data"}
    if unknown or not {"dtype", "shape", "data"} <= set(value):
        raise problems.invalid(name, "keys dtype, shape, data", f"keys {sorted(value)}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    allowed = ALLOWED_DTYPES[name]
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


def _check_arrays(arrays: dict[str, tuple[np.dtype, tuple[int, ...]]], embed_dim: int, max_entries: int) -> None:
    """The snapshot's arrays by (dtype, shape): all three present, allowed dtypes, [N, D] / [N] / [N]."""
    for name in ARRAY_FIELDS:
        if name not in arrays:
            raise problems.invalid(name, "an array", "nothing", f"{name}: required")
    (emb_dtype, emb_shape), lod, positions = (arrays[name] for name in ARRAY_FIELDS)
    if dtype_name(emb_dtype) not in EMBEDDING_DTYPES:
        raise problems.invalid("embeddings.dtype", " | ".join(EMBEDDING_DTYPES), dtype_name(emb_dtype))
    if len(emb_shape) != 2 or emb_shape[1] != embed_dim:
        raise problems.invalid("embeddings.shape", f"[N, {embed_dim}]", str(list(emb_shape)))
    n = emb_shape[0]
    if n < 1:
        raise problems.invalid("embeddings.shape", "at least 1 entry", "0 entries")
    if n > max_entries:
        raise problems.too_large("embeddings.shape", f"{max_entries} entries", f"{n} entries")
    for name, (dtype, shape) in (("lod", lod), ("positions", positions)):
        if dtype_name(dtype) not in INDEX_DTYPES:
            raise problems.invalid(f"{name}.dtype", " | ".join(INDEX_DTYPES), dtype_name(dtype))
        if tuple(shape) != (n,):
            raise problems.invalid(f"{name}.shape", f"[{n}] (one per embedding)", str(list(shape)))


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


def _check_delta(arrays: dict[str, tuple[np.dtype, tuple[int, ...]]], embed_dim: int, max_entries: int) -> None:
    """A session step's arrays, all optional: `created` [M, D], and the appended entries'
    `append_embeddings` [K, D], `append_lod` [K], `append_positions` [K] (all three or none)."""
    appended = [name for name in DELTA_FIELDS[1:] if name in arrays]
    if appended and len(appended) < 3:
        missing = next(name for name in DELTA_FIELDS[1:] if name not in arrays)
        raise problems.invalid(missing, "an array (append_* come together)", "nothing")
    for name in ("created", "append_embeddings"):
        if name in arrays:
            dtype, shape = arrays[name]
            if dtype_name(dtype) not in EMBEDDING_DTYPES:
                raise problems.invalid(f"{name}.dtype", " | ".join(EMBEDDING_DTYPES), dtype_name(dtype))
            if len(shape) != 2 or shape[1] != embed_dim:
                raise problems.invalid(f"{name}.shape", f"[rows, {embed_dim}]", str(list(shape)))
            if shape[0] > max_entries:
                raise problems.too_large(f"{name}.shape", f"{max_entries} entries", f"{shape[0]} entries")
    if appended:
        k = arrays["append_embeddings"][1][0]
        for name in ("append_lod", "append_positions"):
            dtype, shape = arrays[name]
            if dtype_name(dtype) not in INDEX_DTYPES:
                raise problems.invalid(f"{name}.dtype", " | ".join(INDEX_DTYPES), dtype_name(dtype))
            if tuple(shape) != (k,):
                raise problems.invalid(f"{name}.shape", f"[{k}] (one per appended embedding)", str(list(shape)))


SNAPSHOT = Schema(ARRAY_FIELDS, ("embeddings",), _check_arrays)
DELTA = Schema(DELTA_FIELDS, ("created", "append_embeddings"), _check_delta)
