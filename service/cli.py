"""`lensnet-serve`: run the focus service (flags override LENSNET_* environment variables)."""

from __future__ import annotations

import sys
from argparse import Action, ArgumentParser
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliApp, CliSettingsSource

from model_export.artifact import ArtifactError

from .settings import Settings


def _add_argument(parser: ArgumentParser, *names: str, **kwargs: Any) -> Action:
    """argparse's add_argument, with the value shown as the setting's `metavar` (DIR, BYTES,
    SECONDS, …) rather than its Python type (Path, int, {float,null}, list[int])."""
    field = Settings.model_fields.get(kwargs.get("dest", ""))
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    if "metavar" in kwargs and "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    return parser.add_argument(*names, **kwargs)


def main(argv: list[str] | None = None) -> int:
    try:
        source: CliSettingsSource[Settings] = CliSettingsSource(Settings, add_argument_method=_add_argument)
        settings = CliApp.run(Settings, cli_args=sys.argv[1:] if argv is None else argv, cli_settings_source=source)
    except ValidationError as exc:
        print(f"lensnet-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from .server import serve, supervise  # here, not above: --help and bad settings need no ONNX Runtime

    try:
        if settings.workers > 1:
            return supervise(settings)
        serve(settings)
    except ArtifactError as exc:
        print(f"lensnet-serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0
