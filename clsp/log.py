"""Logging for every command: the ``clsp`` logger, set up once at the command line, and progress lines.

Progress bars need a terminal; a batch job (Slurm writes stdout and stderr to a file) gets log lines
instead. INFO lines come from the main process only, so N ranks print one log; warnings and errors come
from every process. Library code logs through ``logging.getLogger(__name__)`` (all under ``clsp``).
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOGGER = "clsp"
_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def is_main_process() -> bool:
    """Rank 0 of Accelerate's process group once it exists, else of the launcher's ``RANK`` variable."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        return bool(state.PartialState().is_main_process)
    return os.environ.get("RANK", "0") == "0"


class _MainProcessInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main_process()


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it per invocation)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Send the ``clsp`` logger's INFO and above to stderr, once per process (later calls do nothing)."""
    logger = logging.getLogger(LOGGER)
    if any(isinstance(handler, _CurrentStderr) for handler in logger.handlers):
        return
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_MainProcessInfo())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Rate:
    """Throughput and ETA of work measured from this object's creation (``done`` counts only new work)."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.start_done, self.started = total, done, time.perf_counter()

    def describe(self, done: int, unit: str, scale: float = 1.0) -> str:
        """``<rate> <unit>/s, ETA <time>`` at ``done`` of ``total``; one counted item is ``scale`` units."""
        elapsed = time.perf_counter() - self.started
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        return f"{rate * scale:.1f} {unit}/s, ETA {eta}"
