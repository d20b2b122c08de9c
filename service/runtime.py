"""The ONNX Runtime backend: one session over the artifact graph that runs fastest here."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lensnet_client.layout import synthetic_layout
from model_export.artifact import CPU_PROVIDER, CUDA_PROVIDER, GRAPH_DTYPES, WRITTEN_OUT_ON_CPU, Manifest, Precision
from service.settings import Device

log = logging.getLogger("lensnet.runtime")
CUDA, CPU = CUDA_PROVIDER, CPU_PROVIDER
PROBE_RUNS = 3  # timed runs per candidate graph (after one untimed), median kept


class Scorer:
    """Scores one snapshot per call. Thread-safe: ONNX Runtime sessions allow concurrent `run`.

    `device` picks the execution provider: `auto` takes CUDA when ONNX Runtime has it and it
    starts, else the CPU; `cpu` and `cuda` are what they say (`cuda` fails unless CUDA runs).
    `precision="auto"` takes the artifact's graphs built for that provider (`GraphSpec.providers`); with more than
    one, it times each on a synthetic WC of `probe_entries` entries and keeps the fastest
    (`probe_ms` records what was measured).
    After a run over at least `shrink_entries` entries the CPU arena hands its free memory back
    to the OS, so one huge snapshot does not pin its peak; smaller runs reuse the arena.
    """

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        precision: str,
        intra_op_threads: int = 0,
        spinning: bool = False,
        probe_entries: int = 8192,
        shrink_entries: int = 8192,
        device: Device = "auto",
    ) -> None:
        available = ort.get_available_providers()
        if device == "cuda" and CUDA not in available:
            raise RuntimeError(f"device cuda: this onnxruntime has no CUDA execution provider (it has {available})")
        use_cuda = device != "cpu" and CUDA in available
        if use_cuda and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed that way
        providers = [CUDA, CPU] if use_cuda else [CPU]
        sessions = _sessions(model_dir, manifest, precision, providers, intra_op_threads, spinning)
        on_cuda = [p for p in sessions if use_cuda and manifest.graphs[p].runs_on(CUDA)]
        if device == "cuda" and not on_cuda:
            cuda_graphs = [p for p, g in manifest.graphs.items() if g.runs_on(CUDA)]
            raise RuntimeError(f"device cuda: no graph of precision {precision} runs on CUDA (these do: {cuda_graphs})")
        if any(sessions[p].get_providers()[0] != CUDA for p in on_cuda):
            # ONNX Runtime lists CUDA but could not start it (driver, libraries): the CPU's graphs.
            if device == "cuda":
                raise RuntimeError("device cuda: the CUDA execution provider did not start (see ONNX Runtime's log)")
            log.warning("the CUDA execution provider did not start; running on the CPU")
            sessions = _sessions(model_dir, manifest, precision, [CPU], intra_op_threads, spinning)
        self.config = manifest.config
        self.probe_ms: dict[str, float] | None = None
        if len(sessions) > 1:
            self.probe_ms = {p: self._probe(s, GRAPH_DTYPES[p], probe_entries) for p, s in sessions.items()}
            log.info("auto precision: median session.run at N=%d: %s", probe_entries, self.probe_ms)
        self.precision: Precision = (
            min(sessions, key=lambda p: self.probe_ms[p]) if self.probe_ms else next(iter(sessions))
        )
        self.session = sessions[self.precision]
        self.provider = self.session.get_providers()[0]
        self.input_dtype = np.dtype(GRAPH_DTYPES[self.precision])
        self.shrink_entries = shrink_entries
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        log.info("loaded %s (%s) on %s", manifest.graphs[self.precision].file, self.precision, self.provider)
        if self.provider == CPU and manifest.graphs[self.precision].attention in WRITTEN_OUT_ON_CPU:
            log.warning(
                "the %s graph's attention (%s) writes out N x N scores on the CPU (about %d MiB per head at "
                "N = 8,192): prefer --precision auto or fp32 there", self.precision,
                manifest.graphs[self.precision].attention, 8192 * 8192 * 4 >> 20,
            )  # fmt: skip

    def _probe(self, session: ort.InferenceSession, dtype: str, n: int) -> float:
        """Median ms of `session.run` on a synthetic valid WC of `n` entries."""
        rng = np.random.default_rng(0)
        lod, positions = synthetic_layout(n, self.config.block_size, self.config.max_lod, rng)
        embeddings = rng.standard_normal((1, n, self.config.embed_dim)).astype(dtype)
        feed = {"embeddings": embeddings, "lod": lod[None], "positions": positions[None]}
        session.run(None, feed)
        times = []
        for _ in range(PROBE_RUNS):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        return round(float(np.median(times)), 3)

    def score(self, embeddings: np.ndarray, lod: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings `[N, D]` in `input_dtype`, int64 `lod`/`positions` `[N]` → float32 scores `[N]`
        and, per entry, whether its embedding holds NaN/inf (checked inside the graph)."""
        feed = {"embeddings": embeddings[None], "lod": lod[None], "positions": positions[None]}
        options = self._shrink if lod.size >= self.shrink_entries else None
        scores, non_finite = self.session.run(["scores", "non_finite"], feed, options)
        return scores[0], non_finite[0]


def _sessions(
    model_dir: Path, manifest: Manifest, precision: str, providers: list[str], threads: int, spinning: bool
) -> dict[Precision, ort.InferenceSession]:
    """A session per candidate graph: the forced one, or (auto) those built for `providers[0]`
    (else the CPU's; else any graph: each still computes the model). A graph runs on the providers
    it may run on (`GraphSpec.runs_on`), the CPU always among them."""
    graphs = manifest.graphs
    built_for = ([p for p, g in graphs.items() if g.runs_on(provider)] for provider in providers)
    chosen = next((candidates for candidates in built_for if candidates), list(graphs))
    sessions = {}
    for p in chosen if precision == "auto" else [precision]:
        graph = graphs[p]  # type: ignore[index]
        usable = [provider for provider in providers if provider == CPU or graph.runs_on(provider)]
        sessions[p] = create_session(model_dir / graph.file, usable, threads, spinning)
    return sessions  # type: ignore[return-value]


def create_session(graph: Path, providers: list[str], intra_op_threads: int, spinning: bool) -> ort.InferenceSession:
    """Idle intra-op threads spin-wait for work by default; between requests that keeps a core
    busy that the event loop needs (on 2 cores: receiving the next body took ~2x as long).
    The CPU arena stays on: reusing it is 10-20 % faster at N = 512-2,048 than fresh allocations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(graph), options, providers=providers)
