"""The README's curl and Python examples run, as written, against a live service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from .live import REPO, LiveService

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```\w+\n(.*?)```", re.DOTALL)


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall((REPO / "README.md").read_text()))


def test_readme_has_both_examples() -> None:
    assert set(examples()) == {"curl", "python"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(live: LiveService) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", examples()["curl"]],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "LENSNET_URL": live.url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["length_before"] == 64 and "edits" in answer and answer["model"]["name"] == "lensnet-demo"


def test_python_example(live: LiveService) -> None:
    result = subprocess.run(
        [sys.executable, "-c", examples()["python"]],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "LENSNET_URL": live.url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"] and "->" in lines[0]
