"""The one error family that commands turn into a single clear line and a non-zero exit."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable


class CaldmError(Exception):
    """Base of every user-facing error; its message is one line that names the file or key.

    ``exit_code`` is the status a command exits with: 2 for bad input (the default), 1 for a run
    that failed after its retries (:class:`TrainingFailed` and friends override it).
    """

    exit_code: int = 2


class ConfigError(CaldmError, ValueError):
    """A bad config key, value, preset or config file."""


class DataError(CaldmError):
    """Bad or missing input data: a corrupt, truncated or mis-shaped file, NaN, a missing label."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")

    def __reduce__(self):  # picklable across Ray processes despite the two-argument init
        return (type(self), (self.url, self.problem))


class BundleError(CaldmError):
    """A model bundle or checkpoint that lacks a module, or belongs to another stage or preset."""


def job_main(prog: str, run: Callable[[], int | None]) -> int:
    """Run one command's body; a :class:`CaldmError` becomes ``<prog>: error: <message>`` on
    stderr and its class's ``exit_code``. ``run`` returns the exit status (``None`` means 0)."""
    try:
        return int(run() or 0)
    except CaldmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


# ------------------------------------------------- exceptions that come back through Ray


def root_cause(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a (Ray-wrapped) worker traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Failed)\b.*:", line):
            return line
    return lines[-1] if lines else type(exc).__name__


def caldm_cause(exc: BaseException) -> CaldmError | None:
    """The first CaldmError in an exception's chain (Ray wraps worker exceptions)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CaldmError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
