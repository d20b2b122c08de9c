"""Every README figure that cites a benchmark report is in that report.

A block of the README (a table or a paragraph, up to the next blank line) that follows
`<!-- figures: benchmarks/reports/…json -->` may only quote numbers the report holds: each
number must equal some value of the report rounded to the README's decimals (thousands
separators and a trailing `×` or `%` aside). The report must name its machine, the command that
made it and its commit, measured on a clean tree at or after the last commit that changed the
code it measures (the service, the export, the bundled model, the client, and its benchmark).
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
NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e-?\d+)?(?![\w])")


def cited_blocks() -> list[tuple[str, str]]:
    return MARKER.findall((REPO / "README.md").read_text())


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


@pytest.mark.parametrize("report,block", cited_blocks(), ids=lambda value: str(value)[:40])
def test_cited_figures_are_in_their_report(report: str, block: str) -> None:
    data = json.loads((REPO / report).read_text())
    for key in ("machine", "command", "commit"):
        assert data.get(key), f"{report} does not name its {key}"
    values = report_values(data)
    missing = [figure for figure in figures(block) if not quoted(figure, values)]
    assert not missing, f"README figures not in {report}: {missing}"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("report", sorted({report for report, _ in cited_blocks()}))
def test_cited_reports_measured_the_current_code(report: str) -> None:
    """A report older than the code it measured would quote figures of code that is gone."""
    data = json.loads((REPO / report).read_text())
    assert data.get("dirty") is False, f"{report} must say it measured a clean tree (dirty: false)"
    paths = [*MEASURED, f"benchmarks/{data['benchmark']}.py"]
    changed = git("rev-list", "-1", "HEAD", "--", *paths)
    measured = subprocess.run(["git", "merge-base", "--is-ancestor", changed, data["commit"]], cwd=REPO)
    assert measured.returncode == 0, (
        f"{report} measured {data['commit'][:10]}, but {changed[:10]} changed what it measures since: rerun it "
        f"(OUT={Path(report).parent} scripts/benchmarks {Path(report).stem}) and commit the report"
    )


def test_a_figure_missing_from_its_report_is_caught() -> None:
    """The check itself: a made-up number next to a real one fails, the real one passes."""
    values = report_values({"results": [{"n": 8192, "ms": {"p50": 1234.5678}, "ratio": 1.0849}]})
    assert figures("| 8,192 | 1,234.6 ms | 1.08× | p50 | -0.5 | 2-3 |") == ["8192", "1234.6", "1.08", "-0.5", "2", "3"]
    assert quoted("-0.134", [-0.134]) and not quoted("0.134", [-0.134])
    assert all(quoted(figure, values) for figure in ["8192", "1234.6", "1.08", "1235"])
    assert not quoted("1234.7", values) and not quoted("1.09", values)
