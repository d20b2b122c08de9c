"""The README's curl and Python examples run, as written, against a live service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


BLOCK = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("readme", ["README.md", "deploy/README.md"])
def test_commands_from_the_virtualenv_are_called_by_their_venv_path(readme: str) -> None:
    """Nothing puts .venv/bin on PATH: a README command that the venv installs (lensnet-export,
    hadolint, pytest, …) is written .venv/bin/<name>, so it runs as written in a fresh shell."""
    venv_bin = Path(sys.executable).parent
    for block in BLOCK.findall((REPO / readme).read_text()):
        for line in block.splitlines():
            words = line.strip().split()
            if words and not words[0].startswith(("#", ".venv/", "scripts/", "/")):
                assert not (venv_bin / words[0]).exists(), f"{readme}: `{line.strip()}` needs .venv/bin/{words[0]}"
