"""Print the service's third-party runtime requirements for one image variant, one per line.

    python deploy/docker/requirements.py cpu|gpu

Read from the two pyproject.toml files (the service's and ./clients'), so the images follow the
project's dependency list without a copy of it. The local `lensnet-client` is left out: the image
installs it from its wheel. The gpu variant swaps `onnxruntime` for `onnxruntime-gpu[cuda,cudnn]`
from 1.27 on (the first PyPI builds for CUDA 13, whose CUDA/cuDNN libraries come as wheels through
those extras): both install the same `onnxruntime` module, so they must never be installed together.
Only the standard library is used: this runs in the image's build stage.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = (ROOT / "pyproject.toml", ROOT / "clients" / "pyproject.toml")
LOCAL = {"lensnet-client", "lensnet-focus"}
VARIANTS = ("cpu", "gpu")
GPU_ONNXRUNTIME = "onnxruntime-gpu[cuda,cudnn]>=1.27"


def _name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(variant: str, projects: tuple[Path, ...] = PROJECTS) -> list[str]:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    found: dict[str, str] = {}
    for path in projects:
        for requirement in tomllib.loads(path.read_text())["project"]["dependencies"]:
            name = _name(requirement)
            if name in LOCAL:
                continue
            if variant == "gpu" and name == "onnxruntime":
                requirement = GPU_ONNXRUNTIME
            found.setdefault(name, requirement.strip())
    return sorted(found.values(), key=str.lower)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(VARIANTS)}")
    print("\n".join(requirements(sys.argv[1])))
