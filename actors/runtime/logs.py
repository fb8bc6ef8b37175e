"""Structured logs: one JSON object per line, carrying the actor, job id and message id in scope."""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC, datetime

import msgspec

#: the job and message being handled by the current task (set by the runtime)
job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")
message_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("message_id", default="")
actor_var: contextvars.ContextVar[str] = contextvars.ContextVar("actor", default="")

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line with the context variables and any ``extra`` fields."""

    _skip = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("actor", actor_var), ("job_id", job_id_var), ("message_id", message_id_var)):
            if value := var.get():
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def setup_logging(level: str = "INFO", *, stream=None) -> None:
    """Send every log record to stderr (or ``stream``) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "botocore", "aiobotocore", "werkzeug", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
