"""RFC 9457 problem details: every error the service answers is one of these.

A `Problem` carries the HTTP status, a stable type slug, a human title and detail, and (for bad
input) the offending `field` with what was `expected` and what was `got`, so a caller can tell
exactly what to fix. Bodies are `application/problem+json`; no stack trace ever leaks.
"""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:lensnet:problem:"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers or {}
        self.extensions = {
            key: value
            for key, value in {"field": field, "expected": expected, "got": got, **extensions}.items()
            if value is not None
        }

    def body(self, instance: str | None = None) -> bytes:
        document = {"type": TYPE_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            document["instance"] = instance
        return json.dumps({**document, **self.extensions}).encode()


def malformed(field: str, expected: str, got: str) -> Problem:
    """The body cannot be parsed (broken JSON or frame)."""
    return Problem(
        400, "malformed-body", "Malformed request body", f"{field}: expected {expected}, got {got}",
        field=field, expected=expected, got=got,
    )  # fmt: skip


def invalid(field: str, expected: str, got: str, detail: str | None = None, **extensions: Any) -> Problem:
    """The body parses but a field is wrong (shape, dtype, value, layout, option)."""
    detail = detail or f"{field}: expected {expected}, got {got}"
    return Problem(
        422, "invalid-field", "Invalid request field", detail, field=field, expected=expected, got=got, **extensions
    )


def too_large(field: str, limit: str, got: str) -> Problem:
    return Problem(
        413, "too-large", "Request too large", f"{field}: at most {limit} accepted, got {got}",
        field=field, expected=f"<= {limit}", got=got,
    )  # fmt: skip


def unavailable(slug: str, title: str, detail: str, retry_after_s: int, status: int = 503) -> Problem:
    """Overload (429), not ready / shutting down (503): always with Retry-After."""
    return Problem(
        status, slug, title, detail, headers={"Retry-After": str(retry_after_s)}, retry_after_s=retry_after_s
    )


def internal_error() -> Problem:
    """A bug, not bad input: the caller learns only that the request failed (the log has the rest)."""
    return Problem(500, "internal-error", "Internal error", "the request failed inside the service; see its log")
