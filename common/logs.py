"""Logging set-up shared by the apps: module loggers under ``fedgen`` packages, one format."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """Idempotent: route our packages' loggers to stderr at FEDGEN_LOG_LEVEL (default INFO), and
    Flower's through its own handler only."""
    level = os.environ.get("FEDGEN_LOG_LEVEL", "INFO").upper()
    for name in ("common", "client", "server"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)
    # Flower's logger prints through its own handler; Opacus calls logging.basicConfig when it is
    # imported, which gives the root logger a handler too, and every Flower line came out twice
    # (once coloured, once with a date). Flower's lines need no second way out.
    logging.getLogger("flwr").propagate = False
