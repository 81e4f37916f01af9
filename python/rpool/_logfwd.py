"""In a worker of `Pool(forward_logs=True)`: send the records tasks log to the parent's `logging`.

A module of its own so that workers without `forward_logs` never import `logging` for it.
"""

from __future__ import annotations

import logging
import pickle

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def record_payload(record: logging.LogRecord) -> bytes:
    """Pickle a LogRecord's attributes for the parent: the message rendered (its arguments may
    not pickle, or mean nothing there), the traceback as text, extras that cannot be pickled as
    their repr."""
    attrs = dict(record.__dict__)
    attrs["msg"] = record.getMessage()
    attrs["args"] = None
    if record.exc_info:
        attrs["exc_text"] = record.exc_text or logging.Formatter().formatException(record.exc_info)
    attrs["exc_info"] = None
    attrs.pop("message", None)
    try:
        return pickle.dumps(attrs, _PROTOCOL)
    except Exception:
        for key, value in attrs.items():
            try:
                pickle.dumps(value, _PROTOCOL)
            except Exception:
                attrs[key] = repr(value)
        return pickle.dumps(attrs, _PROTOCOL)


class ForwardingHandler(logging.Handler):
    """In a worker of `Pool(forward_logs=True)`: send each record to the parent's `logging`."""

    def emit(self, record: logging.LogRecord) -> None:
        # The same record may reach this handler on several loggers of its chain: send it once.
        if getattr(record, "_rpool_forwarded", False):
            return
        record._rpool_forwarded = True
        try:
            from rpool import _rpool

            _rpool.forward_log(record_payload(record))
        except Exception:
            self.handleError(record)


def forward_logs(level: int) -> None:
    """Send this worker's log records to the parent, which handles them with its own handlers.

    Handlers inherited from a forked parent would print each record a second time, so every
    logger that has handlers gets the forwarding handler instead; the root logger always does,
    with the parent's root level.
    """
    handler = ForwardingHandler()
    root = logging.getLogger()
    loggers: list[logging.Logger] = [root] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        if logger.handlers or logger is root:
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.addHandler(handler)
    root.setLevel(level)
