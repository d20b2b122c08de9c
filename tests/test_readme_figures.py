"""Every README figure that cites a benchmark report is in that report.

A block of the README (a table or a paragraph, up to the next blank line) that follows
`<!-- figures: benchmarks/reports/…json -->` may only quote numbers the report holds: each
number must equal some value of the report rounded to the README's decimals (thousands
separators and a trailing `×` or `%` aside). The report must name its machine, the command that
made it and its commit, measured on a clean tree at or after the last commit that changed the
code it measures (the service, the export, the bundled model, the client, and its benchmark).
A report that cannot be rerun here (a lent GPU's) may stay older than that code only if its
block says so: "Measured at <commit>; changed since and not re-measured: <commit>, …", naming
exactly the later commits that changed what it measures.
"""

from __future__ import annotations

import json
import re
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from .live import REPO

MEASURED = ("service", "model_export", "models", "clients/lensnet_client", "benchmarks/__init__.py")
MARKER = re.compile(r"<!-- figures: (\S+) -->\n(.*?)(?:\n\s*\n|\Z)", re.DOTALL)
DECLARED = re.compile(
    r"Measured at ([0-9a-f]{7,40}); changed since and not re-measured: ([0-9a-f]{7,40}(?:, [0-9a-f]{7,40})*)"
)
NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e-?\d+)?(?![\w])")


def cited_blocks() -> list[tuple[str, str]]:
    return MARKER.findall((REPO / "README.md").read_text())


def block_id(value: object) -> str:
    """A test id per cited block: the report's folder/name, then the block's first words."""
    text = str(value)
    return "/".join(text.split("/")[-2:]) if text.endswith(".json") else text[:24]


def figures(block: str) -> list[str]:
    """The numbers of a README block as written (separators removed; a minus kept unless it joins
    two numbers, as in a range "1.17-1.25")."""
    return [match.group(0).replace(",", "") for match in NUMBER.finditer(block)]


def report_values(node: Any) -> list[float]:
    if isinstance(node, dict):
        return [v for key, value in node.items() for v in report_values(key) + report_values(value)]
    if isinstance(node, list):
        return [v for item in node for v in report_values(item)]
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [float(node)]
    if isinstance(node, str) and re.fullmatch(r"\d+", node):
        return [float(node)]
    return []


def quoted(figure: str, values: list[float]) -> bool:
    """`figure` (e.g. "1.08", "358", "2.6e-6") is some value rounded to the figure's precision."""
    if "e" in figure:
        mantissa = figure.split("e")[0]
        target = float(figure)
        places = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return any(v != 0 and f"{v:.{places}e}" == f"{target:.{places}e}" for v in values)
    places = -Decimal(figure).as_tuple().exponent
    return any(round(v, places) == float(figure) for v in values)


def test_the_readme_cites_reports() -> None:
    assert len(cited_blocks()) >= 2


@pytest.mark.parametrize("report,block", cited_blocks(), ids=block_id)
def test_cited_figures_are_in_their_report(report: str, block: str) -> None:
    data = json.loads((REPO / report).read_text())
    for key in ("machine", "command", "commit"):
        assert data.get(key), f"{report} does not name its {key}"
    values = report_values(data)
    missing = [figure for figure in figures(DECLARED.sub("", block)) if not quoted(figure, values)]
    assert not missing, f"README figures not in {report}: {missing}"


def ran_on_cuda(report: dict[str, Any]) -> bool:
    """Whether a report measured CUDA (a lent GPU's, which cannot be rerun on the CPU machine)."""
    engines = [str(row.get("engine", "")) for row in report.get("results", [])]
    return report.get("device") == "CUDAExecutionProvider" or any("-cuda" in engine for engine in engines)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("report,block", cited_blocks(), ids=block_id)
def test_cited_reports_measured_the_current_code(report: str, block: str) -> None:
    """A report older than the code it measured would quote figures of code that is gone, unless
    its block declares exactly which later commits it did not measure."""
    data = json.loads((REPO / report).read_text())
    assert data.get("dirty") is False, f"{report} must say it measured a clean tree (dirty: false)"
    paths = [*MEASURED, f"benchmarks/{data['benchmark']}.py"]
    known = subprocess.run(["git", "cat-file", "-e", f"{data['commit']}^{{commit}}"], cwd=REPO, capture_output=True)
    assert known.returncode == 0, f"{report} measured {data['commit'][:10]}, which is not in this repository's history"
    later = git("rev-list", f"{data['commit']}..HEAD", "--", *paths).split()
    problem = staleness(data, block, later)
    rerun = f"OUT={Path(report).parent} scripts/benchmarks {Path(report).stem}, then commit the report"
    assert problem is None, f"{report}: {problem} ({'declare it' if ran_on_cuda(data) else rerun})"


def staleness(report: dict[str, Any], block: str, later: list[str]) -> str | None:
    """What is wrong with citing `report` in `block`, given the commits since it (`later`) that
    changed what it measures; None if nothing."""
    declared = DECLARED.search(block)
    if declared is None:
        if not later:
            return None
        return f"measured {report['commit'][:10]}, but {later[0][:10]} changed what it measures since"
    if not ran_on_cuda(report):
        return "ran on this machine's kind: rerun it instead of declaring it older"
    if not report["commit"].startswith(declared.group(1)):
        return f"measured {report['commit'][:10]}, not {declared.group(1)}"
    listed = declared.group(2).split(", ")
    named = sorted(next((sha for sha in later if sha.startswith(short)), short) for short in listed)
    if named != sorted(later):
        return f"the commits since it that changed what it measures are {[c[:7] for c in later]}; it declares {listed}"
    return None


def test_an_older_report_is_cited_only_as_declared() -> None:
    """The rule on synthetic reports: undeclared and older fails; a declaration holds only for a
    CUDA report, its own commit, and exactly the later commits."""
    gpu = {"commit": "94e4511aa", "command": "x", "results": [{"engine": "ort-fp16-cuda"}]}
    cpu = {"commit": "94e4511aa", "command": "x", "results": [{"engine": "ort-fp32-cpu"}]}
    block = "Measured at 94e4511; changed since and not re-measured: b5b3565, 924a3b5.\n| 1 |"
    later = ["b5b3565ff", "924a3b5ff"]
    assert staleness(cpu, "| 1 |", []) is None and staleness(gpu, block, later) is None
    assert "b5b3565ff changed what it measures" in str(staleness(cpu, "| 1 |", later))
    assert "rerun it instead" in str(staleness(cpu, block, later))
    assert "not 94e4511" in str(staleness({**gpu, "commit": "1111111"}, block, later))
    assert "it declares" in str(staleness(gpu, block, later[:1]))  # one listed commit did not change it
    assert "it declares" in str(staleness(gpu, block, [*later, "abcdef0ff"]))  # a later change left out


def test_a_declaration_names_its_commits_and_hides_no_figure() -> None:
    """The declaration's commits are not figures; the numbers around it still are."""
    block = "Measured at 94e4511; changed since and not re-measured: b5b3565, 0123abc.\n| 8,192 | 2.36 |"
    declared = DECLARED.search(block)
    assert declared is not None and declared.groups() == ("94e4511", "b5b3565, 0123abc")
    assert figures(DECLARED.sub("", block)) == ["8192", "2.36"]


def test_a_figure_missing_from_its_report_is_caught() -> None:
    """The check itself: a made-up number next to a real one fails, the real one passes."""
    values = report_values({"results": [{"n": 8192, "ms": {"p50": 1234.5678}, "ratio": 1.0849}]})
    assert figures("| 8,192 | 1,234.6 ms | 1.08× | p50 | -0.5 | 2-3 |") == ["8192", "1234.6", "1.08", "-0.5", "2", "3"]
    assert quoted("-0.134", [-0.134]) and not quoted("0.134", [-0.134])
    assert all(quoted(figure, values) for figure in ["8192", "1234.6", "1.08", "1235"])
    assert not quoted("1234.7", values) and not quoted("1.09", values)
