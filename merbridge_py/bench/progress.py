"""A progress line with the time left, on stderr.

Time left = planned seconds still to run x (real seconds per planned second so
far): the plan knows how long the loads run, the pace corrects for what it
cannot know (agent start-up, process start, a slow machine). On a terminal the
line redraws in place; elsewhere (CI logs, pipes) one line is printed per
mode block, so a log shows progress without a wall of carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from .runner import Step

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, steps: list[Step], stream: TextIO = sys.stderr,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None):
        self.total = sum(s.weight for s in steps) or 1.0
        self.done = 0.0
        self.stream = stream
        self.clock = clock
        self.start = clock()
        self.tty = stream.isatty() if tty is None else tty
        self._width = 0

    def line(self, step: Step) -> str:
        fraction = min(1.0, self.done / self.total)
        elapsed = self.clock() - self.start
        left = (self.total - self.done) * (elapsed / self.done) if self.done else self.total
        filled = round(fraction * BAR_WIDTH)
        return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} "
                f"{format_duration(left)} left, {format_duration(elapsed)} so far: {step.label}")

    def __call__(self, step: Step) -> None:
        """Call after `step` has finished."""
        self.done += step.weight
        text = self.line(step)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif step.kind == "mode":
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
