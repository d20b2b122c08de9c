"""A real `lensnet-serve` process on a loopback port, for tests that need the whole service."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

from lensnet_client import synthetic_layout

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveService:
    """`python -m service` with the given flags; `stop()` sends SIGTERM and returns the exit code.
    With `hooks`, the service runs under `tests.hooked_service` with those stage hooks."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, hooks: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        env = {**(env or {}), **({"LENSNET_TEST_HOOKS": json.dumps(hooks)} if hooks else {})}
        launcher = "tests.hooked_service" if hooks else "service"
        command = [sys.executable, "-m", launcher, "--port", str(self.port), "--warmup-sizes", "[32]", *flags]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=self._log, cwd=REPO, env={**os.environ, **(env or {})}
        )
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 60) -> LiveService:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value} (label order as exposed)."""
        samples = {}
        for line in self.http.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples


def wait_for_metric(service: LiveService, key: str, value: float, timeout: float = 30) -> None:
    """Wait until the sample `key` reaches `value` (AssertionError after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while service.metrics().get(key, 0) < value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {service.metrics().get(key)}"
        time.sleep(0.01)


def snapshot(n: int, d: int = 256, seed: int = 0, dtype: Any = np.float16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random valid WC for the bundled model (B = 32, max LOD 2)."""
    rng = np.random.default_rng(seed)
    lod, positions = synthetic_layout(n, 32, 2, rng)
    return rng.standard_normal((n, d)).astype(dtype), lod, positions
