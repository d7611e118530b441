"""Progress reporting for long CLI steps: a live line on a terminal, silence otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StepProgress:
    """Shows ``[elapsed] message`` on one rewritten stderr line, only when stderr is a TTY.

    Piped output, CI logs and ``--quiet`` get nothing: the final result is what matters there.
    """

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._t0 = time.perf_counter()
        self._width = 0

    def __call__(self, message: str) -> None:
        """Replace the progress line with ``message``."""
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self._t0:6.1f}s] {message}"
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def bar(self, done: int, total: int, label: str) -> None:
        """Draw a bar for ``done`` out of ``total`` units."""
        if not self.enabled or total <= 0:
            return
        filled = int(30 * min(done, total) / total)
        self(f"{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")

    def close(self) -> None:
        """End the progress line so later output starts on a fresh line."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
