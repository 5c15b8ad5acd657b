"""Logging with the request id on every line: a context variable set per request by the
middleware, read by a filter on the handler (so uvicorn's and our loggers both get it)."""

from __future__ import annotations

import contextvars
import logging

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class StartupError(RuntimeError):
    """A start refused on purpose (a --lora that does not fit its model): logged as one line."""


class StartupErrorFilter(logging.Filter):
    """uvicorn logs a failed start as the lifespan's whole traceback; a StartupError's is cut to its message."""

    marker = f"{StartupError.__name__}: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Traceback") and self.marker in message:
            record.msg, record.args = "error: " + message.rsplit(self.marker, 1)[1].strip(), ()
        return True


def logging_config(level: str) -> dict:
    """A dictConfig for uvicorn.run(log_config=...): one stderr handler for everything."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}, "startup_error": {"()": StartupErrorFilter}},
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id", "startup_error"],
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["stderr"], "level": level, "propagate": False},
            "glmserve": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }
