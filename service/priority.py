"""Background threads that must yield the CPU to the model's threads (shadow scoring)."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("lensnet.priority")
LOW_PRIORITY = 19  # nice value: on a busy machine the model's threads always come first


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: threads have their own nice value);
    a ThreadPoolExecutor initializer."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
    except (OSError, AttributeError):
        log.warning("could not lower the priority of thread %s", threading.current_thread().name)
