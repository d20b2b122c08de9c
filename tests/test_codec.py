"""Wire decoding while the body arrives, and the C kernels under it (conversion, bucket counts).

The streaming `FrameReader` must give exactly what `frame.unpack` + one conversion gives, however
the body is cut into chunks; the kernels must match numpy bit for bit.
"""

from __future__ import annotations

import itertools
import json
import platform
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensnet_client import frame
from service.core import _allocator, _bulk, codec, problems
from service.settings import Settings

D = 16
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
STREAM_MIN = Settings().stream_min_bytes  # the service's default


def body(n: int = 5, dtype: np.dtype = F16, lod_dtype: str = "int64", **fields: object) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(n)
    embeddings = (rng.standard_normal((n, D)) * 100).astype(dtype)
    lod, positions = np.zeros(n, dtype=lod_dtype), np.arange(n, dtype=np.int64)
    fields = fields or {"options": {"w_max": n}}
    return frame.pack(fields, {"embeddings": embeddings, "lod": lod, "positions": positions}), embeddings


def feed(
    data: bytes, cuts: list[int], target: np.dtype = F32, declared: int | None = -1, stream_min: int = STREAM_MIN
) -> codec.DecodedRequest:
    reader = codec.reader(codec.FRAME, D, 1000, target, len(data) if declared == -1 else declared, stream_min)
    edges = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for lo, hi in itertools.pairwise(edges):
        reader.feed(data[lo:hi], more=hi < len(data))
    reader.close()
    return reader.finish()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    st.integers(1, 300),
    st.sampled_from([F16, F32]),
    st.sampled_from([F16, F32]),
    st.lists(st.integers(0, 10**6), max_size=40),
    st.booleans(),
    st.sampled_from([0, STREAM_MIN]),
)
def test_any_chunking_decodes_like_unpack_and_one_conversion(
    n: int, sent: np.dtype, target: np.dtype, cuts: list[int], declared: bool, stream_min: int
) -> None:
    """Streamed (decoded chunk by chunk) or not (decoded whole by finish), the same arrays."""
    data, embeddings = body(n, sent, lod_dtype="uint8")
    request = feed(data, cuts, target, declared=-1 if declared else None, stream_min=stream_min)
    fields, arrays = frame.unpack(data)
    assert request.fields == fields and request.style == "frame"
    snapshot = request.snapshot
    assert snapshot.embeddings.dtype == target and snapshot.sent_dtype == sent.name
    with np.errstate(over="ignore"):
        assert np.array_equal(snapshot.embeddings, embeddings.astype(target))
    assert np.array_equal(snapshot.lod, arrays["lod"]) and snapshot.lod.dtype == np.uint8
    assert np.array_equal(snapshot.positions, arrays["positions"])


def test_byte_by_byte_splits_every_element() -> None:
    data, embeddings = body(7, F16)
    assert np.array_equal(feed(data, list(range(len(data)))).snapshot.embeddings, embeddings.astype(np.float32))


def test_bytes_still_arriving_are_placed_at_once_the_last_ones_by_finish() -> None:
    data, embeddings = body(40, F16)
    cut = end_of(data, "lod")
    reader = codec.reader(codec.FRAME, D, 64, F32, None, STREAM_MIN)  # no Content-Length: streamed
    reader.feed(data[:cut], more=True)
    placed = reader.sinks["embeddings"].array.copy()  # embeddings and lod are in before the end
    assert np.array_equal(placed, embeddings.astype(np.float32))
    reader.feed(data[cut:], more=False)
    reader.close()
    assert reader.sinks["positions"].done == 0  # the last chunk waits for the inference thread
    assert np.array_equal(reader.finish().snapshot.positions, np.arange(40))


def test_a_small_body_is_decoded_by_finish_only() -> None:
    """Under stream_min_bytes a body arrives faster than it decodes: nothing to hide the work
    behind, so all of it happens in `finish` (the inference thread), errors included."""
    data, embeddings = body(40, F16)
    reader = codec.reader(codec.FRAME, D, 64, F32, len(data), stream_min_bytes=len(data) + 1)
    reader.feed(data[:-100], more=True)
    reader.feed(data[-100:], more=False)
    reader.close()
    assert not reader.sinks  # nothing parsed on the event loop
    assert np.array_equal(reader.finish().snapshot.embeddings, embeddings.astype(np.float32))


def end_of(data: bytes, name: str) -> int:
    """Where array `name`'s bytes end in a frame."""
    length = frame.header_length(data)
    spec = frame.array_spec(name, frame.parse_header(data[8 : 8 + length])[1][name])
    return frame.payload_start(length) + spec.offset + spec.nbytes


def problem_of(
    data: bytes, chunks: int = 1, declared: int | None = -1, stream_min: int = STREAM_MIN
) -> problems.Problem:
    """The Problem a body raises; `chunks`: how many equal pieces it is fed in."""
    reader = codec.reader(codec.FRAME, D, 64, F32, len(data) if declared == -1 else declared, stream_min)
    step = -(-len(data) // chunks) or 1
    with pytest.raises(problems.Problem) as info:
        for at in range(0, max(len(data), 1), step):
            reader.feed(data[at : at + step], more=at + step < len(data))
        reader.close()
        reader.finish()
    return info.value


def test_a_bad_header_is_refused_before_the_payload_arrives() -> None:
    wrong_d = frame.pack({}, {"embeddings": np.zeros((4, D + 1), np.float16), "lod": np.zeros(4, np.int64),
                              "positions": np.arange(4)})  # fmt: skip
    reader = codec.reader(codec.FRAME, D, 64, F32, None, STREAM_MIN)  # streamed (no Content-Length)
    header_end = frame.payload_start(frame.header_length(wrong_d))
    with pytest.raises(problems.Problem) as info:
        reader.feed(wrong_d[:header_end], more=True)  # the header alone is enough
    assert (info.value.status, info.value.extensions["field"]) == (422, "embeddings.shape")


@pytest.mark.parametrize(
    ("mutate", "status", "field"),
    [
        (lambda b: b[:3], 400, "frame"),  # shorter than the prefix
        (lambda b: b"XXXX" + b[4:], 400, "frame"),
        (lambda b: b[:8] + b"{not json" + b[17:], 400, "frame"),
        (lambda b: b[: end_of(b, "positions") - 1], 400, "positions"),  # truncated inside the last array
        (lambda b: b.replace(b'"float16"', b'"complex"', 1), 422, "embeddings.dtype"),
        (lambda b: b.replace(b'"int64"', b'"float"', 1), 422, "lod.dtype"),  # same length: header intact
    ],
)
def test_malformed_frames_name_the_part(mutate, status: int, field: str) -> None:
    data, _ = body(6)
    for chunks, stream_min in itertools.product((1, 7), (0, STREAM_MIN)):  # streamed, and decoded whole
        problem = problem_of(mutate(data), chunks, stream_min=stream_min)
        assert (problem.status, problem.extensions["field"]) == (status, field)


def test_a_header_that_claims_more_than_the_body_is_refused_before_allocating() -> None:
    n = 2000
    data = frame.pack({}, {"embeddings": np.ones((n, D), np.float16), "lod": np.zeros(n, np.int64),
                           "positions": np.arange(n)})  # fmt: skip
    # Content-Length says the body is shorter than the arrays the header describes.
    short = end_of(data, "positions") - 1
    reader = codec.reader(codec.FRAME, D, n, F32, short, stream_min_bytes=0)  # streamed
    with pytest.raises(problems.Problem) as info:
        reader.feed(data[: frame.payload_start(frame.header_length(data))], more=True)  # the header is enough
    assert info.value.status == 400 and info.value.extensions["field"] == "positions"
    assert "inside the payload" in info.value.extensions["expected"] and not reader.sinks
    # Without Content-Length the same body is caught at the end, before it waits for a slot.
    reader = codec.reader(codec.FRAME, D, n, F32, None, STREAM_MIN)
    reader.feed(data[:short], more=False)
    with pytest.raises(problems.Problem) as info:
        reader.close()
    assert info.value.status == 400


def test_a_header_too_large_to_parse_on_the_event_loop_is_413() -> None:
    huge = b"LNF1" + (codec.MAX_HEADER_BYTES + 1).to_bytes(4, "little")
    reader = codec.reader(codec.FRAME, D, 64, F32, None, STREAM_MIN)
    with pytest.raises(problems.Problem) as info:
        reader.feed(huge, more=True)  # refused from the prefix alone, before any of the header arrives
    assert (info.value.status, info.value.extensions["field"]) == (413, "frame.header")


def test_too_many_entries_is_413_and_unknown_arrays_422() -> None:
    big = frame.pack({}, {"embeddings": np.zeros((65, D), np.float16), "lod": np.zeros(65, np.int64),
                          "positions": np.arange(65)})  # fmt: skip
    assert problem_of(big).status == 413
    extra, _ = body(3)
    extra = frame.pack({}, {**frame.unpack(extra)[1], "mask": np.zeros(3, np.int8)})
    assert (problem_of(extra).status, problem_of(extra).extensions["field"]) == (422, "mask")


def test_json_arrays_come_out_in_the_graph_dtype() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((3, D)).astype(np.float32)
    text = json.dumps({"embeddings": embeddings.tolist(), "lod": [0, 0, 0], "positions": [0, 1, 2], "x": 1})
    reader = codec.reader(codec.JSON, D, 64, F16, None, STREAM_MIN)
    reader.feed(text.encode()[:10], more=True)
    reader.feed(text.encode()[10:], more=False)
    request = reader.finish()
    assert request.fields == {"x": 1} and request.style == "list"
    assert request.snapshot.sent_dtype == "float64"  # JSON numbers
    assert np.array_equal(request.snapshot.embeddings, embeddings.astype(np.float16))


def cpu_has_f16c() -> bool:
    """What the kernel reports of this CPU (x86 Linux: the f16c and avx flags), independently of _bulk."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return False
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return {"f16c", "avx"} <= set(flags.split(":", 1)[1].split())


@pytest.mark.parametrize("vector", [True, False], ids=["f16c", "portable"])
def test_conversions_match_numpy_bit_for_bit(vector: bool) -> None:
    used = _bulk.set_vector(vector)
    try:
        assert used == (vector and cpu_has_f16c())  # the vector path exactly where the CPU has F16C
        halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
        out = np.empty(halves.size, np.float32)
        _bulk.half_to_float(halves, out)
        expected = halves.astype(np.float32)
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(out), nan)
        assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))

        rng = np.random.default_rng(1)
        floats = np.concatenate([
            (rng.standard_normal(50_000) * 10.0 ** rng.integers(-9, 6, 50_000)).astype(np.float32),
            np.arange(0, 2**32, 65_537, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every exponent
            np.float32([65504, 65520, 65519.99, 2**-24, 2**-25, 3 * 2**-26, -0.0, np.inf, -np.inf]),
        ])  # fmt: skip
        with np.errstate(over="ignore", invalid="ignore"):
            expected16 = floats.astype(np.float16)
        out16 = np.empty(floats.size, np.float16)
        _bulk.float_to_half(floats, out16)
        nan = np.isnan(expected16)
        assert np.array_equal(np.isnan(out16), nan)
        assert np.array_equal(out16[~nan].view(np.uint16), expected16[~nan].view(np.uint16))

        # Unaligned sources: a body chunk can split an array at any byte.
        raw = np.zeros(2 * 1001 + 1, np.uint8)
        raw[1:].view(np.float16)[:] = halves[:1001]
        odd = np.frombuffer(raw.data, dtype=np.float16, count=1001, offset=1)
        _bulk.half_to_float(odd, out[:1001])
        assert np.array_equal(out[:1001], halves[:1001].astype(np.float32), equal_nan=True)
    finally:
        _bulk.set_vector(True)


def test_kernels_refuse_buffers_they_were_not_built_for() -> None:
    with pytest.raises(TypeError):
        _bulk.half_to_float(np.zeros(4, np.float16), np.zeros(4, np.float16))  # target items: 2 bytes, not 4
    with pytest.raises(ValueError, match="whole 2-byte items"):
        _bulk.half_to_float(b"\x00" * 7, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="room for 4 items from item 1"):
        _bulk.half_to_float(np.zeros(4, np.float16), np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="aligned"):
        _bulk.half_to_float(b"\x00" * 2, np.frombuffer(bytearray(9), np.float32, 2, offset=1))
    with pytest.raises(ValueError, match="outside"):
        _bulk.bucket_counts(np.zeros(2, np.float32), np.array([0, 5]), np.array([0.0]), np.zeros(4, np.int64))
    lod, pos = np.zeros(4, np.int64), np.arange(4)
    common = {"positions": pos, "no_expand": np.empty(0, np.int64), "no_collapse": np.empty(0, np.int64),
              "block_size": 2, "max_lod": 1, "w_max": 4, "tau_expand": 0.5, "tau_collapse": 0.5, "max_edits": 4,
              "aggregation": 0, "protect_recent": 0}  # fmt: skip
    with pytest.raises(TypeError, match="scores"):
        _allocator.allocate(lod=lod, scores=np.zeros(4), clamped=np.zeros(4, np.float32), **common)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        _allocator.allocate(lod=np.full(4, 7), scores=np.zeros(4, np.float32), clamped=np.zeros(4, np.float32),
                            **common)  # fmt: skip
    with pytest.raises(ValueError, match="overflows"):
        _allocator.layout_is_valid(lod, pos, 2**40, 3)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(0, 2000), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_bucket_counts_equal_searchsorted_and_bincount(n: int, groups: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    edges = np.array([-1.0, -0.9, -0.5, 0.0, 0.5, 0.9, 1.0])
    near = edges.astype(np.float32)  # the floats on each side of an edge (0.9 is no float): compared exactly
    neighbours = [np.nextafter(near, np.float32(-2)), np.nextafter(near, np.float32(2))]
    candidates = [edges, *neighbours, rng.uniform(-1.2, 1.2, 20)]
    values = rng.choice(np.concatenate(candidates), n).astype(np.float32)
    lod = rng.integers(0, groups, n)
    counts = np.zeros(groups * (edges.size + 1), np.int64)
    _bulk.bucket_counts(values, lod, edges, counts)
    expected = np.bincount(lod * (edges.size + 1) + np.searchsorted(edges, values), minlength=counts.size)
    assert np.array_equal(counts, expected)
