"""The service's one typed settings object: CLI flags > `LENSNET_*` environment variables > defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LENSNET_",
        cli_prog_name="lensnet-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    model_dir: Path = Field(BUNDLED_MODEL, description="model artifact directory (default: the bundled demo model)")
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto", description="graph to run: auto = fp16 on the CUDA execution provider when available, else fp32 on CPU"
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model session")
    max_concurrency: int = Field(1, ge=1, le=256, description="inferences running at once per process")
    queue_size: int = Field(16, ge=0, le=4096, description="requests allowed to wait for a slot; beyond it: 429")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="largest accepted request body; beyond it: 413")
    max_entries: int = Field(32768, ge=1, description="largest accepted WC length N; beyond it: 413")
    stream_min_bytes: int = Field(
        4 << 20, ge=0, description="frames at least this large are decoded while they arrive (smaller: after)"
    )
    latency_budget_ms: float = Field(3.0, gt=0, description="server-side budget; slower requests are counted")
    default_timeout_ms: float | None = Field(
        None, gt=0, description="deadline for requests without an X-Request-Timeout-Ms header (none: no deadline)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = one per core)")
    intra_op_spinning: bool = Field(
        False, description="let ONNX Runtime's idle intra-op threads spin (off: they leave the cores to the server)"
    )
    max_sessions: int = Field(
        10000, ge=1, description="focus sessions held per process; beyond it the least recently used go"
    )
    session_memory_bytes: int = Field(
        2 << 30, ge=1 << 20, description="bytes of session state (embeddings in the graph's dtype) held per process"
    )
    session_ttl_s: float = Field(600.0, gt=0, description="a session idle this long is dropped")
    warmup_sizes: list[int] = Field([64, 512, 2048], description="WC lengths run once before /readyz turns ready")
    shutdown_grace_s: float = Field(20.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if any(size < 1 for size in self.warmup_sizes):
            raise ValueError("warmup_sizes: every size must be >= 1")
        return self
