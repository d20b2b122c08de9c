"""Deployment traces for the training repo: what the service saw and decided, and the feedback.

A sampled fraction of focus decisions (`--trace-sample-rate`, default 0: off) is written to
`--trace-dir` as Parquet files (`decisions/`, `feedback/`: one dataset each), with the ΔNLL
feedback that later arrives for them, so the training repo can learn from labels collected under
the deployment's own distribution. The
request path only hands references to a bounded queue (`put_nowait`); one writer thread turns
them into Arrow tables and writes a file per kind every `--trace-flush-s` seconds or
`--trace-file-rows` rows (to a temporary name, renamed when complete), then deletes the oldest
files beyond `--trace-max-bytes`. A full queue or a failing disk drops records and counts them;
it never slows or fails a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .core.allocator import Allocation, AllocatorOptions
from .metrics import Metrics

log = logging.getLogger("lensnet.traces")
SCHEMA_VERSION = 1
EDIT = pa.struct([
    ("index", pa.int32()), ("action", pa.string()), ("lod", pa.int8()), ("position", pa.int64()),
    ("score", pa.float64()), ("cause", pa.string()),
])  # fmt: skip
OPTIONS = pa.struct([
    ("w_max", pa.int64()), ("tau_expand", pa.float64()), ("tau_collapse", pa.float64()), ("max_edits", pa.int32()),
    ("aggregation", pa.string()), ("protect_recent", pa.int64()), ("cooldown_steps", pa.int32()),
])  # fmt: skip
SCHEMAS = {
    "decisions": pa.schema([
        ("decision_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")), ("model_version", pa.string()),
        ("model_sha256", pa.string()), ("n", pa.int32()), ("lod", pa.list_(pa.int8())),
        ("positions", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32())), ("edits", pa.list_(EDIT)),
        ("options", OPTIONS), ("embeddings", pa.large_binary()), ("embeddings_dtype", pa.string()),
        ("embed_dim", pa.int32()),
    ], metadata={"lensnet.trace.schema": str(SCHEMA_VERSION)}),
    "feedback": pa.schema([
        ("decision_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")), ("edit", pa.int32()),
        ("delta_nll", pa.float64()),
    ], metadata={"lensnet.trace.schema": str(SCHEMA_VERSION)}),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One traced decision, as references (converted to Arrow in the writer thread)."""

    decision_id: str
    time: float  # Unix seconds
    lod: np.ndarray
    positions: np.ndarray
    scores: np.ndarray  # raw model scores, before the legality clamp
    allocation: Allocation
    options: AllocatorOptions
    embeddings: np.ndarray | None  # only with --trace-embeddings


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    decision_id: str
    time: float
    edit: int
    delta_nll: float


class TraceWriter:
    """The bounded queue and the writer thread (see the module docstring)."""

    def __init__(self, directory: Path, model: dict[str, str], metrics: Metrics, *, queue_size: int,
                 file_rows: int, flush_s: float, max_bytes: int) -> None:  # fmt: skip
        self.directory, self.model, self.metrics = directory, model, metrics
        self.file_rows, self.flush_s, self.max_bytes = file_rows, flush_s, max_bytes
        for kind in SCHEMAS:
            (directory / kind).mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[DecisionRecord | FeedbackRecord | None] = queue.Queue(queue_size)
        self._files = 0
        self._thread = threading.Thread(target=self._run, name="lensnet-traces", daemon=True)
        self._thread.start()

    def offer(self, record: DecisionRecord | FeedbackRecord) -> None:
        """Queue a record for writing, or drop it (counted) when the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.metrics.trace_dropped.labels(reason="queue_full").inc()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("trace queue still full at shutdown: the records in it are lost")
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: dict[str, list[Any]] = {"decisions": [], "feedback": []}
        started = time.monotonic()
        running = True
        while running:
            try:
                record = self._queue.get(timeout=max(0.05, started + self.flush_s - time.monotonic()))
            except queue.Empty:
                record = ...
            if record is None:
                running = False
            elif record is not ...:
                pending["decisions" if isinstance(record, DecisionRecord) else "feedback"].append(record)
            full = any(len(rows) >= self.file_rows for rows in pending.values())
            if full or not running or time.monotonic() - started >= self.flush_s:
                for kind, rows in pending.items():
                    if rows:
                        self._write(kind, rows)
                        rows.clear()
                started = time.monotonic()

    def _write(self, kind: str, rows: list[Any]) -> None:
        self._files += 1
        name = f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{self._files:06d}.parquet"
        final, partial = self.directory / kind / name, self.directory / kind / f".{name}.partial"
        try:
            table = self._decisions(rows) if kind == "decisions" else self._feedback(rows)
            pq.write_table(table, partial, compression="zstd")
            partial.rename(final)
        except Exception:  # a full or failing disk: these rows are lost, counted, and serving goes on
            log.exception("writing %d trace records failed", len(rows))
            self.metrics.trace_dropped.labels(reason="write_error").inc(len(rows))
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            return
        self.metrics.trace_written.labels(kind=kind).inc(len(rows))
        try:
            self._retain()
        except OSError:
            log.exception("deleting old trace files failed")

    def _retain(self) -> None:
        """Delete the oldest trace files until the directory holds at most `max_bytes` of them."""
        files = sorted(self.directory.glob("*/*.parquet"), key=lambda path: path.stat().st_mtime_ns)
        total = sum(path.stat().st_size for path in files)
        for path in files:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            self.metrics.trace_files_deleted.inc()

    def _decisions(self, rows: list[DecisionRecord]) -> pa.Table:
        def edits(record: DecisionRecord) -> list[dict[str, Any]]:
            return [{"index": e.index, "action": e.action, "lod": e.lod_before, "position": e.position,
                     "score": e.score, "cause": e.cause} for e in record.allocation.edits]  # fmt: skip

        def options(o: AllocatorOptions) -> dict[str, Any]:
            return {name: getattr(o, name) for name in OPTIONS.names}

        columns = {
            "decision_id": [r.decision_id for r in rows],
            "time": [int(r.time * 1e6) for r in rows],
            "model_version": [self.model["version"]] * len(rows),
            "model_sha256": [self.model["sha256"]] * len(rows),
            "n": [int(r.lod.size) for r in rows],
            "lod": [r.lod.astype(np.int8) for r in rows],
            "positions": [r.positions for r in rows],
            "scores": [r.scores.astype(np.float32) for r in rows],
            "edits": [edits(r) for r in rows],
            "options": [options(r.options) for r in rows],
            "embeddings": [
                None if r.embeddings is None else np.ascontiguousarray(r.embeddings).tobytes() for r in rows
            ],
            "embeddings_dtype": [None if r.embeddings is None else "<" + r.embeddings.dtype.str[1:] for r in rows],
            "embed_dim": [None if r.embeddings is None else int(r.embeddings.shape[1]) for r in rows],
        }
        return pa.table(columns, schema=SCHEMAS["decisions"])

    def _feedback(self, rows: list[FeedbackRecord]) -> pa.Table:
        columns = {
            "decision_id": [r.decision_id for r in rows],
            "time": [int(r.time * 1e6) for r in rows],
            "edit": [r.edit for r in rows],
            "delta_nll": [r.delta_nll for r in rows],
        }
        return pa.table(columns, schema=SCHEMAS["feedback"])
