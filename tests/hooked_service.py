"""`python -m tests.hooked_service [lensnet-serve flags]`: the real service, with known work added
to chosen stages, so tests can check where time is attributed and make deadlines, overload and
drains happen by construction rather than because this machine's CPU is slow.

The hooks come from the environment variable LENSNET_TEST_HOOKS, a JSON object mapping a stage to
what its real work does first:

- a number: sleep that many seconds (`{"model": 0.2}`): the stage's time grows by that much;
- `{"gate": DIR}`: once DIR/armed exists (a test arms it after start-up, so warm-up passes, or
  before, to hold the warm-up), write DIR/entered-<k> (k = 1, 2, … per call), then wait until
  DIR/open exists (at most 60 s, then go on), so a test knows a request is inside the stage and
  decides when it leaves;
- `{"fail": DIR}`: while DIR/armed exists, raise `RuntimeError` (a bug in the stage, not bad
  input), so a test sees what the service answers and keeps after one.

`Gate` is the test's side of a gate: arm it, see requests enter, open or close it again.

Stages and the work that is hooked: admit (the admission place), queue (waiting for a model
slot), decode (finishing the body's decoding), apply (staging a session delta), model
(`Scorer.score`), allocate (the allocator), telemetry (score and allocation observation), encode
(the answer's encoding), handoff (the way back: the inference thread's work is done, the event
loop has not taken the answer yet), and place (not a request stage: a session's row placement
after an answer, holding the session). `model` wraps every `Scorer`, a shadow model's too: gate another stage
when a shadow runs. One worker only (`--workers 1`): the hooks live in this process.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

GATE_TIMEOUT_S = 60.0


class Gate:
    """The test's side of a `{"gate": DIR}` hook. Closed until `open()`; `close()` shuts it again for
    the requests that enter afterwards. Every wait is bounded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def spec(self) -> dict[str, str]:
        """The hook spec that makes a stage wait at this gate."""
        return {"gate": str(self.directory)}

    def arm(self) -> Gate:
        """From now on requests stop at the gate (before: warm-up passes); arming before the service
        starts holds its warm-up too."""
        (self.directory / "armed").touch()
        return self

    def entered(self) -> int:
        """Calls that have reached the gate since it was armed (open or not)."""
        return sum(1 for _ in self.directory.glob("entered-*"))

    def wait_entered(self, count: int, timeout: float = 30) -> None:
        """Wait until `count` calls have reached the gate (AssertionError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while self.entered() < count:
            assert time.monotonic() < deadline, f"{self.entered()} of {count} calls reached the gate in {timeout} s"
            time.sleep(0.005)

    def open(self) -> None:
        (self.directory / "open").touch()

    def close(self) -> None:
        (self.directory / "open").unlink(missing_ok=True)


def _pause(spec: Any) -> Callable[[], None]:
    """The action a hook spec stands for (see the module docstring)."""
    if isinstance(spec, int | float):
        return functools.partial(time.sleep, float(spec))
    if "fail" in spec:
        armed = Path(spec["fail"]) / "armed"

        def fail() -> None:
            if armed.exists():
                raise RuntimeError("hooked_service: a planted failure")

        return fail
    gate = Path(spec["gate"])
    counter, lock = itertools.count(1), threading.Lock()

    def wait() -> None:
        if not (gate / "armed").exists():
            return
        with lock:
            k = next(counter)
        (gate / f"entered-{k}").touch()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not (gate / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    return wait


def _before(owner: Any, name: str, pause: Callable[[], None]) -> None:
    """Make `owner.name` (a function or method) run `pause` first."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        pause()
        return original(*args, **kwargs)

    setattr(owner, name, hooked)


def install(hooks: dict[str, Any]) -> None:
    """Patch the service's stage work with the given hooks (before the app is built)."""
    from service import pipeline
    from service.core import codec, sessions
    from service.http import admission, app
    from service.metrics import Metrics
    from service.runtime import Scorer

    targets: dict[str, list[tuple[Any, str]]] = {
        "decode": [(codec.JsonReader, "finish"), (codec.FrameReader, "finish")],
        "apply": [(sessions, "stage")],
        "model": [(Scorer, "score")],
        "allocate": [(pipeline, "allocate")],
        "telemetry": [(Metrics, "observe_allocation")],
        "encode": [(codec, "encode_response")],
        "place": [(sessions, "place")],
    }
    for stage, spec in hooks.items():
        pause = _pause(spec)
        if stage == "admit":
            _hook_place(admission.Admission, pause)
        elif stage == "queue":
            _hook_slot(admission.Admission, pause)
        elif stage == "handoff":
            _after(app, "_run", pause)
        elif stage in targets:
            for owner, name in targets[stage]:
                _before(owner, name, pause)
        else:
            expected = ["admit", "queue", "handoff", *targets]
            raise SystemExit(f"hooked_service: unknown stage {stage!r}; expected one of {expected}")


def _after(owner: Any, name: str, pause: Callable[[], None]) -> None:
    """Make `owner.name` run `pause` once it has done its work, before it returns."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hooked(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        pause()
        return result

    setattr(owner, name, hooked)


def _hook_place(cls: Any, pause: Callable[[], None]) -> None:
    original = cls.place

    @contextlib.contextmanager
    def place(self: Any, nbytes: int) -> Iterator[None]:
        pause()
        with original(self, nbytes):
            yield

    cls.place = place


def _hook_slot(cls: Any, pause: Callable[[], None]) -> None:
    import asyncio

    original = cls.slot

    @contextlib.asynccontextmanager
    async def slot(self: Any, deadline: float | None) -> AsyncIterator[None]:
        await asyncio.to_thread(pause)
        async with original(self, deadline):
            yield

    cls.slot = slot


def main() -> int:
    install(json.loads(os.environ.get("LENSNET_TEST_HOOKS", "{}")))
    from service.cli import main as serve

    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
