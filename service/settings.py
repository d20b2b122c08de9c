"""The service's one typed settings object: CLI flags > `LENSNET_*` environment variables > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
Device = Literal["auto", "cpu", "cuda"]
"""Where the model runs (`Settings.device`)."""


def _shown_as(metavar: str) -> dict[str, str]:
    """How --help shows a setting's value (service/cli.py), in place of its Python type."""
    return {"metavar": metavar}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LENSNET_",
        cli_prog_name="lensnet-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    model_dir: Path = Field(BUNDLED_MODEL, description="model artifact directory", json_schema_extra=_shown_as("DIR"))
    device: Device = Field(
        "auto",
        description="execution provider: auto = CUDA when ONNX Runtime has it and it starts, else the CPU; "
        "cpu = the CPU even where CUDA runs; cuda = the model fails to load (never ready) unless CUDA runs",
    )
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto",
        description="graph to run: auto = the artifact graph that runs fastest on this machine's execution provider "
        "(CUDA when available, else CPU), timed at startup on a WC of --auto-probe-entries entries",
    )
    auto_probe_entries: int = Field(
        8192,
        ge=1,
        le=65536,
        description="WC length --precision auto times the candidate graphs on",
        json_schema_extra=_shown_as("N"),
    )
    arena_shrink_entries: int = Field(
        8192,
        ge=1,
        description="after scoring a WC at least this long, ONNX Runtime's CPU arena frees its unused memory",
        json_schema_extra=_shown_as("N"),
    )
    host: str = Field(
        "127.0.0.1",
        description="interface to listen on (0.0.0.0 in containers)",
        json_schema_extra=_shown_as("ADDRESS"),
    )
    port: int = Field(
        8000, ge=0, le=65535, description="TCP port (0 = any free port)", json_schema_extra=_shown_as("PORT")
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes, each with its own model session",
        json_schema_extra=_shown_as("N"),
    )
    max_concurrency: int = Field(
        1, ge=1, le=256, description="inferences running at once per process", json_schema_extra=_shown_as("N")
    )
    queue_size: int = Field(
        16,
        ge=0,
        le=4096,
        description="requests admitted besides the running ones (uploading or waiting for a slot); beyond it: 429",
        json_schema_extra=_shown_as("N"),
    )
    max_body_bytes: int = Field(
        64 << 20,
        ge=1024,
        description="largest accepted request body; beyond it: 413",
        json_schema_extra=_shown_as("BYTES"),
    )
    max_entries: int = Field(
        16384,
        ge=1,
        description="largest accepted WC length N; beyond it: 413 (memory grows ~150 bytes x N x D)",
        json_schema_extra=_shown_as("N"),
    )
    max_bytes_in_flight: int = Field(
        256 << 20, ge=1024,
        description="request bodies held at once, from their first byte to the answer (Content-Length; "
        "max-body-bytes when not declared); beyond it: 429",
        json_schema_extra=_shown_as("BYTES"),
    )  # fmt: skip
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="longest wait for the next chunk of a request body; beyond it: 408",
        json_schema_extra=_shown_as("SECONDS"),
    )
    body_min_bytes_per_s: int = Field(
        64 << 10, ge=0,
        description="slowest average upload rate, enforced once an upload has run body-timeout-s; "
        "below it: 408 (0: no minimum)",
        json_schema_extra=_shown_as("BYTES_PER_S"),
    )  # fmt: skip
    stream_min_bytes: int = Field(
        4 << 20,
        ge=0,
        description="frames at least this large are decoded while they arrive (smaller: after)",
        json_schema_extra=_shown_as("BYTES"),
    )
    latency_budget_ms: float = Field(
        3.0, gt=0, description="server-side budget; slower requests are counted", json_schema_extra=_shown_as("MS")
    )
    default_timeout_ms: float | None = Field(
        None,
        gt=0,
        description="deadline for requests without an X-Request-Timeout-Ms header (null: none)",
        json_schema_extra=_shown_as("MS"),
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads (0 = one per core)", json_schema_extra=_shown_as("N")
    )
    intra_op_spinning: bool = Field(
        False, description="let ONNX Runtime's idle intra-op threads spin (off: they leave the cores to the server)"
    )
    max_sessions: int = Field(
        10000,
        ge=1,
        description="focus sessions held per process; beyond it the least recently used go",
        json_schema_extra=_shown_as("N"),
    )
    session_memory_bytes: int = Field(
        2 << 30,
        ge=1 << 20,
        description="bytes of session state (embeddings in the graph's dtype, metadata, history) held per process",
        json_schema_extra=_shown_as("BYTES"),
    )
    session_ttl_s: float = Field(
        600.0, gt=0, description="a session idle this long is dropped", json_schema_extra=_shown_as("SECONDS")
    )
    warmup_sizes: list[int] = Field(
        [64, 512, 2048],
        description="WC lengths run once before /readyz turns ready: comma-separated, or a JSON list",
        json_schema_extra=_shown_as("N,N,..."),
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM, how long in-flight requests may finish",
        json_schema_extra=_shown_as("SECONDS"),
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    decision_memory_size: int = Field(
        65536,
        ge=1,
        le=1 << 24,
        description="focus decisions remembered for feedback (the oldest are forgotten)",
        json_schema_extra=_shown_as("N"),
    )
    decision_memory_s: float = Field(
        600.0,
        gt=0,
        description="how long a decision is remembered for feedback",
        json_schema_extra=_shown_as("SECONDS"),
    )
    feedback_max_items: int = Field(
        10000,
        ge=1,
        le=1 << 20,
        description="items accepted in one /v1/feedback batch",
        json_schema_extra=_shown_as("N"),
    )
    correlation_window_count: int = Field(
        1000,
        ge=2,
        le=1 << 20,
        description="score-benefit correlation over the last this many feedback items",
        json_schema_extra=_shown_as("N"),
    )
    correlation_window_s: float = Field(
        600.0,
        gt=0,
        description="score-benefit correlation over the feedback of the last this many seconds",
        json_schema_extra=_shown_as("SECONDS"),
    )
    shadow_model_dir: Path | None = Field(
        None,
        description="a candidate artifact that scores a sampled share of focus requests off the request path",
        json_schema_extra=_shown_as("DIR"),
    )
    shadow_sample_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of focus requests offered to the shadow",
        json_schema_extra=_shown_as("FRACTION"),
    )
    shadow_intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime threads of the shadow (0 = one per core)", json_schema_extra=_shown_as("N")
    )
    trace_dir: Path | None = Field(
        None, description="directory for the deployment traces (Parquet); none: off", json_schema_extra=_shown_as("DIR")
    )
    trace_sample_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of focus decisions traced, with their feedback (0: off)",
        json_schema_extra=_shown_as("FRACTION"),
    )
    trace_embeddings: bool = Field(False, description="also trace the snapshots' embeddings (large)")
    trace_queue_size: int = Field(
        1024,
        ge=1,
        le=1 << 20,
        description="trace records waiting to be written; beyond it they are dropped (counted)",
        json_schema_extra=_shown_as("N"),
    )
    trace_file_rows: int = Field(
        10000,
        ge=1,
        description="a trace file is written once this many records are waiting",
        json_schema_extra=_shown_as("N"),
    )
    trace_flush_s: float = Field(
        60.0,
        gt=0,
        description="... or this many seconds after the previous one, whichever comes first",
        json_schema_extra=_shown_as("SECONDS"),
    )
    trace_max_bytes: int = Field(
        1 << 30,
        ge=1,
        description="trace files kept on disk; the oldest are deleted beyond",
        json_schema_extra=_shown_as("BYTES"),
    )
    correlation_window_max_samples: int = Field(
        20000,
        ge=2,
        le=1 << 22,
        description="at most this many (the newest) samples in the time window",
        json_schema_extra=_shown_as("N"),
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if any(size < 1 for size in self.warmup_sizes):
            raise ValueError("warmup_sizes: every size must be >= 1")
        if self.max_bytes_in_flight < self.max_body_bytes:
            raise ValueError("max_bytes_in_flight: must be >= max_body_bytes (or the largest bodies never fit)")
        return self
