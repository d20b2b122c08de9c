"""The set-up scripts a new user runs first: scripts/bootstrap, scripts/serve, scripts/apt-get-wait."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .live import REPO

SCRIPTS = REPO / "scripts"


def run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_a_current_venv_skips_pip_and_serve_help_is_quick() -> None:
    """The first call may install (if the inputs changed since the last one); after it, bootstrap
    says the venv is current without running pip, and `scripts/serve --help` takes about a second."""
    assert run(SCRIPTS / "bootstrap", "serve").returncode == 0
    started = time.monotonic()
    again = run(SCRIPTS / "bootstrap", "serve")
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr
    assert time.monotonic() - started < 2  # pip alone takes 5+ s
    started = time.monotonic()
    shown = run(SCRIPTS / "serve", "--help")
    assert shown.returncode == 0 and "--max-entries" in shown.stdout
    assert time.monotonic() - started < 5  # was 7.4 s: pip, then importing ONNX Runtime for --help


def test_bootstrap_calls_apt_only_through_the_waiting_wrapper() -> None:
    lines = [line for line in (SCRIPTS / "bootstrap").read_text().splitlines() if "apt-get" in line]
    assert lines and all("scripts/apt-get-wait" in line for line in lines if not line.lstrip().startswith("#"))


@pytest.mark.skipif(os.geteuid() != 0, reason="holding apt's locks needs root")
def test_apt_get_wait_waits_for_a_held_lock() -> None:
    """Another process holds apt's lists lock for 3 s (as a running `apt-get update` would): the
    wrapper waits for it instead of failing at once with "Could not get lock"."""
    lock_path = Path("/var/lib/apt/lists/lock")
    with open(lock_path, "rb+") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        threading.Timer(3, fcntl.lockf, (lock, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        result = run(SCRIPTS / "apt-get-wait", "check", "-q", timeout=120)
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed >= 2.5 and "waiting for another apt/dpkg process" in result.stderr
