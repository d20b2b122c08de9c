"""Deployment traces: the writer (schema, rotation, drops) and the live service writing them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lensnet_client import FocusClient, synthetic_layout
from service.core.allocator import AllocatorOptions, allocate, check_layout
from service.metrics import Metrics
from service.traces import SCHEMAS, DecisionRecord, FeedbackRecord, TraceWriter

from .live import LiveService, snapshot

MODEL = {"version": "0.1.0-test", "sha256": "ab" * 32}


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def decision(rng: np.random.Generator, decision_id: str, embeddings: bool = False) -> DecisionRecord:
    lod, positions = synthetic_layout(300, 32, 2, rng)
    scores = rng.uniform(-1, 1, lod.size).astype(np.float32)
    options = AllocatorOptions(block_size=32, max_lod=2, w_max=200, max_edits=16)
    allocation = allocate(check_layout(lod, positions, 32, 2), scores, options)
    kept = rng.standard_normal((lod.size, 8)).astype(np.float16) if embeddings else None
    return DecisionRecord(decision_id, 1.8e9, lod, positions, scores, allocation, options, kept)


def writer(directory: Path, metrics: Metrics, **overrides: float) -> TraceWriter:
    settings = {"queue_size": 64, "file_rows": 1000, "flush_s": 60.0, "max_bytes": 1 << 30} | overrides
    return TraceWriter(directory, MODEL, metrics, **settings)  # type: ignore[arg-type]


def test_written_traces_read_back_with_pyarrow_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    metrics = Metrics(0.003, 2)
    traces = writer(tmp_path, metrics)
    records = [decision(rng, "a-0", embeddings=True), decision(rng, "a-1")]
    for record in records:
        traces.offer(record)
    traces.offer(FeedbackRecord("a-0", 1.8e9 + 1, 2, -0.25))
    traces.close()
    (decisions,) = tmp_path.glob("decisions/decisions-*.parquet")
    (feedback,) = tmp_path.glob("feedback/feedback-*.parquet")
    assert not list(tmp_path.glob("*/.*"))  # no partial files left
    table = pq.read_table(decisions)
    assert table.schema.equals(SCHEMAS["decisions"]) and table.schema.metadata[b"lensnet.trace.schema"] == b"1"
    rows = table.to_pylist()
    for row, record in zip(rows, records, strict=True):
        assert row["decision_id"] == record.decision_id and row["model_sha256"] == MODEL["sha256"]
        assert row["n"] == record.lod.size and row["lod"] == record.lod.tolist()
        assert row["positions"] == record.positions.tolist() and row["scores"] == record.scores.tolist()
        assert [(e["index"], e["action"], e["lod"], e["score"], e["cause"]) for e in row["edits"]] == [
            (e.index, e.action, e.lod_before, e.score, e.cause) for e in record.allocation.edits
        ]
        assert row["options"]["w_max"] == 200 and row["options"]["max_edits"] == 16
    assert rows[0]["embeddings_dtype"] == "<f2" and rows[0]["embed_dim"] == 8
    restored = np.frombuffer(rows[0]["embeddings"], dtype=rows[0]["embeddings_dtype"]).reshape(-1, 8)
    np.testing.assert_array_equal(restored, records[0].embeddings)
    assert rows[1]["embeddings"] is None
    assert pq.read_table(feedback).to_pylist()[0] | {"time": None} == {
        "decision_id": "a-0", "time": None, "edit": 2, "delta_nll": -0.25
    }  # fmt: skip
    assert counter(metrics, "lensnet_trace_records_written_total", kind="decisions") == 2
    assert counter(metrics, "lensnet_trace_records_written_total", kind="feedback") == 1


def test_files_rotate_and_the_oldest_go_beyond_the_byte_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    metrics = Metrics(0.003, 2)
    traces = writer(tmp_path, metrics, file_rows=1, max_bytes=20_000)
    for k in range(12):
        traces.offer(decision(rng, f"a-{k:x}"))
        time.sleep(0.02)  # distinct modification times
    traces.close()
    files = sorted(tmp_path.glob("decisions/*.parquet"))
    assert 1 <= len(files) < 12 and sum(path.stat().st_size for path in files) <= 20_000
    assert counter(metrics, "lensnet_trace_files_deleted_total") == 12 - len(files)
    kept = [pq.read_table(path)["decision_id"][0].as_py() for path in files]
    assert kept == [f"a-{k:x}" for k in range(12 - len(files), 12)]  # the newest survive


def test_a_failing_disk_or_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    metrics = Metrics(0.003, 2)
    target = tmp_path / "traces"
    traces = writer(target, metrics, file_rows=1)
    for kind in ("decisions", "feedback"):
        (target / kind).rmdir()
        (target / kind).write_text("not a directory")  # every write fails now
    for k in range(2):
        traces.offer(decision(rng, f"a-{k}"))
        deadline = time.monotonic() + 10
        while counter(metrics, "lensnet_trace_records_dropped_total", reason="write_error") < k + 1:
            assert time.monotonic() < deadline and traces._thread.is_alive(), "the writer survives a failed write"
            time.sleep(0.01)
    traces.close()
    assert counter(metrics, "lensnet_trace_records_dropped_total", reason="write_error") == 2

    slow = writer(tmp_path / "slow", metrics, queue_size=2, file_rows=1)
    offered = 200
    record = decision(rng, "a-1")
    started = time.perf_counter()
    for _ in range(offered):
        slow.offer(record)
    assert time.perf_counter() - started < 0.5, "offer never blocks"
    slow.close()
    dropped = counter(metrics, "lensnet_trace_records_dropped_total", reason="queue_full")
    written = counter(metrics, "lensnet_trace_records_written_total", kind="decisions")
    assert dropped > 0 and dropped + written == offered


# --- the live service ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveService, Path]]:
    directory = tmp_path_factory.mktemp("traces")
    service = LiveService("--trace-dir", str(directory), "--trace-sample-rate", "1", "--trace-flush-s", "0.2",
                          "--trace-embeddings").wait_ready()  # fmt: skip
    yield service, directory
    assert service.stop() == 0


def test_the_service_traces_its_decisions_and_their_feedback(traced: tuple[LiveService, Path]) -> None:
    live, directory = traced
    embeddings, lod, positions = snapshot(256, seed=7)
    with FocusClient(live.url, timeout=60) as client:
        result = client.focus(embeddings, lod, positions, w_max=128, return_scores=True)
        assert result.edits and client.feedback([(result.decision_id, 0, 0.125)]) == ["matched"]
        model = client.model()
    deadline = time.monotonic() + 30
    while not (list(directory.glob("feedback/*.parquet")) and list(directory.glob("decisions/*.parquet"))):
        assert time.monotonic() < deadline, "no trace files written"
        time.sleep(0.1)
    rows = pq.read_table(directory / "decisions").to_pylist()  # the directory is one dataset
    (row,) = [row for row in rows if row["decision_id"] == result.decision_id]
    assert row["model_sha256"] == model["sha256"] and row["model_version"] == model["version"]
    assert row["lod"] == lod.tolist() and row["positions"] == positions.tolist()
    np.testing.assert_array_equal(np.array(row["scores"], dtype=np.float32), result.scores)
    assert [(e["index"], e["action"], e["cause"]) for e in row["edits"]] == [
        (e.index, e.action, e.cause) for e in result.edits
    ]
    np.testing.assert_array_equal(
        np.frombuffer(row["embeddings"], dtype=row["embeddings_dtype"]).reshape(lod.size, -1),
        embeddings.astype(np.dtype(row["embeddings_dtype"])),
    )
    feedback = pq.read_table(directory / "feedback").to_pylist()
    assert [(f["decision_id"], f["edit"], f["delta_nll"]) for f in feedback] == [(result.decision_id, 0, 0.125)]
