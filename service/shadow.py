"""Shadow scoring: a candidate artifact scores a sampled share of focus requests off the request path.

The focus answer never waits for it: a sampled request hands its snapshot (references) to the
shadow's own single slot, a low-priority thread with its own ONNX Runtime session; if that slot is
busy the sample is dropped and counted, so the shadow can neither delay nor fail a request nor
queue up work. The shadow runs the same allocator with the request's options and history, and the
agreement with the live model (`core/agreement.py`) goes to the metrics.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lensnet_client.layout import Layout
from model_export.artifact import ArtifactError, Manifest

from .core.agreement import compare
from .core.allocator import Allocation, AllocatorOptions, Cooldown, allocate
from .metrics import Metrics
from .priority import lower_priority
from .runtime import Scorer

log = logging.getLogger("lensnet.shadow")


def check_compatible(live: Manifest, shadow: Manifest) -> None:
    """A shadow must read the same snapshots: same D, block size and max LOD (else ArtifactError)."""
    fields = ("embed_dim", "block_size", "max_lod")
    differ = [f"{f}: {getattr(shadow.config, f)} vs {getattr(live.config, f)}" for f in fields
              if getattr(shadow.config, f) != getattr(live.config, f)]  # fmt: skip
    if differ:
        raise ArtifactError(f"the shadow model cannot score the live model's snapshots ({', '.join(differ)})")


class ShadowScorer:
    """One slot for the candidate model (see the module docstring)."""

    def __init__(self, scorer: Scorer, metrics: Metrics, sample_rate: float) -> None:
        self.scorer, self.metrics, self.sample_rate = scorer, metrics, sample_rate
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lensnet-shadow", initializer=lower_priority)
        self._busy = threading.Lock()

    def offer(
        self,
        embeddings: np.ndarray,
        layout: Layout,
        options: AllocatorOptions,
        cooldown: Cooldown,
        live_scores: np.ndarray,
        live: Allocation,
    ) -> None:
        """Score this request in the shadow if it is sampled and the slot is free; never blocks."""
        if random.random() >= self.sample_rate:
            return
        if not self._busy.acquire(blocking=False):
            self.metrics.shadow_requests.labels(result="dropped").inc()
            return
        # A copy: the live buffers (a session's rows) may change once the answer is out.
        self.executor.submit(self._run, embeddings.copy(), layout, options, cooldown, live_scores, live)

    def _run(
        self,
        embeddings: np.ndarray,
        layout: Layout,
        options: AllocatorOptions,
        cooldown: Cooldown,
        live_scores: np.ndarray,
        live: Allocation,
    ) -> None:
        try:
            scores, _ = self.scorer.score(embeddings.astype(self.scorer.input_dtype, copy=False), layout.lod,
                                          layout.positions)  # fmt: skip
            if not np.isfinite(scores).all():
                raise ValueError("the shadow model produced non-finite scores")
            shadow = allocate(layout, scores, options, cooldown)
            self.metrics.observe_shadow(compare(live_scores, scores, live.edits, shadow.edits))
        except Exception:
            log.exception("shadow scoring failed")
            self.metrics.shadow_requests.labels(result="failed").inc()
        finally:
            self._busy.release()
