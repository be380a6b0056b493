"""Progress of a long job: a tqdm bar on stderr, plus a plain line every so often for logs
that do not render bars (Ray job logs, CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class RateProgress:
    """A tqdm bar plus a line every ``every`` seconds: ``<desc>: done/total done, r <unit>/min``
    (and how many failed)."""

    def __init__(
        self, total: int, every: float, log: Callable[[str], None], desc: str, unit: str
    ) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit=unit[:3], desc=desc, file=sys.stderr)
        self.total, self.every, self.log, self.desc, self.unit = total, every, log, desc, unit
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, failed: bool) -> None:
        """One item finished (``failed``: without a result)."""
        self.done += 1
        self.failed += failed
        self.bar.update(1)
        if time.monotonic() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        """Log the plain progress line now."""
        self.last = time.monotonic()
        minutes = max(self.last - self.start, 1e-9) / 60
        made = self.done - self.failed
        self.log(
            f"{self.desc}: {self.done}/{self.total} done, {made / minutes:.2f} {self.unit}/min"
            + (f", {self.failed} failed" if self.failed else "")
        )

    def close(self) -> None:
        self.bar.close()
        self.line()
