"""kt-connect style log lines ("12:01PM INF ...") on stderr."""

from __future__ import annotations

import logging
import sys
import time

_LEVELS = {"DEBUG": "DBG", "INFO": "INF", "WARNING": "WRN", "ERROR": "ERR", "CRITICAL": "FTL"}


class _KtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%I:%M%p", time.localtime(record.created))
        msg = record.getMessage()
        if record.exc_info and logging.getLogger("ktproxy").isEnabledFor(logging.DEBUG):
            msg += "\n" + self.formatException(record.exc_info)
        return f"{stamp} {_LEVELS.get(record.levelname, record.levelname[:3])} {msg}"


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KtFormatter())
    root = logging.getLogger("ktproxy")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    # asyncssh logs every channel at INFO; that drowns ours.
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if debug else logging.WARNING)
