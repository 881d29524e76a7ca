"""Logging helpers every layer may use: the harness logs on the ``rfc`` logger, and the command
line (rfc.run.cli) decides where its lines go (run.log, the terminal)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

LOG = logging.getLogger("rfc")


@contextmanager
def timed(what: str) -> Iterator[dict[str, str]]:
    """Log ``<what>: <seconds> s`` when the block ends normally; the block may add a detail to
    the line with ``info["detail"] = ...``."""
    info: dict[str, str] = {}
    t0 = time.perf_counter()
    yield info
    detail = f" ({info['detail']})" if info.get("detail") else ""
    LOG.info("%s: %.2f s%s", what, time.perf_counter() - t0, detail)
