"""`lensnet-serve`: run the focus service (flags override LENSNET_* environment variables)."""

from __future__ import annotations

import sys

from pydantic import ValidationError
from pydantic_settings import CliApp

from model_export.artifact import ArtifactError

from .server import serve, supervise
from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    try:
        settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print(f"lensnet-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        if settings.workers > 1:
            return supervise(settings)
        serve(settings)
    except ArtifactError as exc:
        print(f"lensnet-serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0
