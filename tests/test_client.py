"""The Python client: frames, history, retry policy, and both clients against a live service."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from lensnet_client import AsyncFocusClient, Edit, FocusClient, FocusError, History, apply_edits, frame, validate_layout
from lensnet_client.client import _Protocol, parse_server_timing

from .live import LiveService, snapshot


def test_frame_round_trip_is_exact_and_zero_copy() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "embeddings": rng.standard_normal((7, 5)).astype(np.float16),
        "lod": np.array([0, 1, 2], dtype=np.int8),
        "positions": np.arange(3, dtype=np.int64) * 10**12,
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    body = frame.pack({"options": {"w_max": 3}}, arrays)
    header, decoded = frame.unpack(body)
    assert header == {"options": {"w_max": 3}}
    for name, array in arrays.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)
        assert array.size == 0 or np.shares_memory(decoded[name], np.frombuffer(body, dtype=np.uint8))  # a view
    start = body.index(arrays["embeddings"].tobytes())
    assert start % frame.ALIGN == 0


def raw_frame(arrays: dict, payload: bytes = bytes(64)) -> bytes:
    """A frame with a hand-written array table (the prefix is always right)."""
    header = json.dumps({"arrays": arrays}).encode()
    start = -(-(8 + len(header)) // frame.ALIGN) * frame.ALIGN
    return (b"LNF1" + len(header).to_bytes(4, "little") + header).ljust(start, b" ") + payload


GOOD = {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"NOPE" + raw_frame({"x": GOOD})[4:], "expected magic"),
        (b"LNF1\x00", "at least 8 bytes"),
        (b"LNF1" + (10**6).to_bytes(4, "little") + b"{}", "header inside the body, got a body of 10 bytes"),
        (b"LNF1" + (3).to_bytes(4, "little") + b"{x}", "expected a JSON header, got invalid JSON"),
        (raw_frame({"x": GOOD | {"nbytes": 9}}), "x.nbytes: expected 8"),
        (raw_frame({"x": GOOD | {"offset": -1}}), "x.offset: expected a non-negative integer"),
        (raw_frame({"x": GOOD | {"shape": ["2"]}}), "x.shape"),
        (raw_frame({"x": GOOD | {"dtype": "complex64"}}), "x.dtype"),
        (raw_frame({"x": GOOD | {"offset": 60}}), "x: expected its bytes 60…68 inside the payload"),
        (raw_frame({"x": [1, 2]}), "expected an array descriptor"),
    ],
)
def test_frame_defects_are_named(body: bytes, message: str) -> None:
    assert frame.unpack(raw_frame({"x": GOOD}))[1]["x"].shape == (2,)  # the well-formed baseline
    with pytest.raises(frame.FrameError, match=message):
        frame.unpack(body)


def test_history_ages_and_forgets() -> None:
    history = History(horizon=2)
    history.record([Edit("expand", 3, 1, 32, 1, 0, 64, 32, 0.9, "threshold")])
    assert history.entries() == [{"action": "expand", "lod": 1, "position": 64, "age": 1}]
    history.record([Edit("collapse", 0, 32, 1, 0, 1, 0, 32, -0.7, "threshold")])
    assert history.entries() == [
        {"action": "collapse", "lod": 1, "position": 0, "age": 1},
        {"action": "expand", "lod": 1, "position": 64, "age": 2},
    ]
    history.record([])
    assert history.entries() == [{"action": "collapse", "lod": 1, "position": 0, "age": 2}]


def test_server_timing_parse() -> None:
    assert parse_server_timing("receive;dur=0.4, model;desc=x;dur=12.5,total;dur=13") == {
        "receive": 0.4, "model": 12.5, "total": 13.0,
    }  # fmt: skip
    assert parse_server_timing(None) == {}


def _response(status: int, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(status, headers={"retry-after": retry_after} if retry_after else {})


def test_retry_policy() -> None:
    protocol = _Protocol("binary", retries=3, backoff=0.01, max_backoff=2.0)
    assert protocol.retry_delay(0, _response(200)) is None
    assert protocol.retry_delay(0, _response(422)) is None
    assert protocol.retry_delay(0, _response(429)) == pytest.approx(0.01)
    assert protocol.retry_delay(2, _response(503)) == pytest.approx(0.04)
    assert protocol.retry_delay(0, _response(429, "1")) == 1.0  # Retry-After wins when longer
    assert protocol.retry_delay(0, _response(429, "5")) is None  # longer than max_backoff: give up
    assert protocol.retry_delay(3, _response(429)) is None  # out of retries
    assert protocol.retry_delay(0, None) == pytest.approx(0.01)  # connection failure


def test_sync_client_steps_the_working_context(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(600, seed=11)
    history = History()
    with FocusClient(live.url) as client:
        assert client.ready()
        assert client.model()["block_size"] == 32
        for _ in range(3):
            result = client.focus(embeddings, lod, positions, w_max=590, history=history, return_scores=True)
            assert result.scores is not None and result.scores.shape == (lod.size,)
            assert {"decode", "model", "allocate", "encode", "total"} <= set(result.server_timing)
            lod, positions = apply_edits(lod, positions, result.edits, 32)
            validate_layout(lod, positions, 32, 2)
            assert lod.size == result.length_after
            history.record(result.edits)
            embeddings = np.random.default_rng(lod.size).standard_normal((lod.size, 256)).astype(np.float16)
        assert history.entries() and max(entry["age"] for entry in history.entries()) == 3
        scored = client.score(embeddings, lod, positions)
        assert scored.scores.shape == (lod.size,) and scored.model["precision"] == "fp32"
        with pytest.raises(FocusError) as error:
            client.focus(embeddings, lod, positions + 1, w_max=10)
        assert error.value.status == 422 and error.value.field and error.value.field.startswith("positions[")


def test_async_client_matches_sync_client(live: LiveService) -> None:
    embeddings, lod, positions = snapshot(400, seed=12)

    async def run() -> tuple:
        async with AsyncFocusClient(live.url, format="json") as client:
            assert await client.ready()
            return await asyncio.gather(*(client.focus(embeddings, lod, positions, w_max=380) for _ in range(3)))

    results = asyncio.run(run())
    with FocusClient(live.url) as client:
        reference = client.focus(embeddings, lod, positions, w_max=380)
    assert all(r.edits == reference.edits and r.length_after == reference.length_after for r in results)


def test_client_never_casts_metadata_lossily() -> None:
    protocol = _Protocol("binary", 0, 0.0, 0.0)
    embeddings = np.zeros((3, 4), dtype=np.float16)
    with pytest.raises(TypeError, match="lod: expected integers"):
        protocol.build(embeddings, np.array([0.0, 1.5, 0.0]), np.arange(3), {}, None)
    _, arrays = frame.unpack(protocol.build(embeddings, np.array([0, 300, 0]), np.arange(3), {}, None)[0])
    assert arrays["lod"].tolist() == [0, 300, 0]  # sent as it is; the service rejects it precisely


def test_client_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be"):
        FocusClient("http://127.0.0.1:1", format="xml")  # type: ignore[arg-type]
