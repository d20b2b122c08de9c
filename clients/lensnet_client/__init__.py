"""Python client for the LensNet focus service, and the working-context layout rules.

from lensnet_client import FocusClient, History, apply_edits

with FocusClient("http://127.0.0.1:8000") as client:
    result = client.focus(embeddings, lod, positions, w_max=8192, history=history)
    lod, positions = apply_edits(lod, positions, result.edits, block_size=32)
    history.record(result.edits)
"""

from .client import AsyncFocusClient, FocusClient, FocusError, FocusResult, History, ScoreResult
from .layout import (
    Edit,
    Layout,
    SnapshotError,
    apply_edits,
    apply_step,
    edit_rows,
    synthetic_layout,
    validate_layout,
)
from .session import AsyncFocusSession, FocusSession

__all__ = [
    "AsyncFocusClient",
    "AsyncFocusSession",
    "Edit",
    "FocusClient",
    "FocusError",
    "FocusResult",
    "FocusSession",
    "History",
    "Layout",
    "ScoreResult",
    "SnapshotError",
    "apply_edits",
    "apply_step",
    "edit_rows",
    "synthetic_layout",
    "validate_layout",
]
