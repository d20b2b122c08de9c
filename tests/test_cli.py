"""`lensnet-serve --help`: every option shown once, with a placeholder that says what to type."""

from __future__ import annotations

import re
import subprocess
import sys

from .live import REPO


def help_text() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_placeholders_say_what_to_type() -> None:
    text = help_text()
    usage = text.split("options:")[0]
    shown = dict(re.findall(r"\[--([a-z-]+) ([^\]|]+)\]", usage))
    assert shown, usage
    for flag, metavar in shown.items():  # upper-case words (N, BYTES, N,N,...) or a {choice,…} list
        assert re.fullmatch(r"[A-Z_]+|N,N,\.\.\.|\{[a-z0-9,]+\}", metavar), (flag, metavar)
    assert "null" not in usage and "list[" not in usage and "Path" not in usage


def test_each_option_shows_one_default() -> None:
    options = re.split(r"\n  (?=--)", help_text().split("options:")[1])[1:]
    assert len(options) > 15
    for option in options:
        assert option.count("(default") <= 1, option
