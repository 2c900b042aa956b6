"""Logging configured once, for the runner and for each notebook kernel: console plus the daily file
`logs/pipeline_YYYYMMDD.log`, with every secret in force replaced by *** before anything is written."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        text = message
        for secret in self.secrets:
            text = text.replace(secret, "***")
        if text != message or record.exc_info:
            if record.exc_info:
                exc_text = logging.Formatter().formatException(record.exc_info)
                for secret in self.secrets:
                    exc_text = exc_text.replace(secret, "***")
                text = f"{text}\n{exc_text}"
                record.exc_info = None
                record.exc_text = None
            record.msg, record.args = text, None
        return True


def log_file(logs_dir: Path) -> Path:
    return logs_dir / f"pipeline_{datetime.now(timezone.utc):%Y%m%d}.log"


def setup(logs_dir: Path, secrets: list[str] = (), level: int = logging.INFO, stream=None,
          stream_level: int | None = None, stream_format: str = FORMAT) -> Path:
    """Send `lib` and runner logs to the console and the daily file. Safe to call again.
    `stream_level`/`stream_format` quieten the console alone (a notebook shows warnings, the file
    keeps everything)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = log_file(logs_dir)
    redact = RedactSecrets(list(secrets))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_medallion", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(logging.Formatter(stream_format))
    if stream_level is not None:
        console.setLevel(stream_level)
    logfile = logging.FileHandler(path, encoding="utf-8")
    logfile.setFormatter(logging.Formatter(FORMAT))
    for handler in (console, logfile):
        handler._medallion = True
        handler.addFilter(redact)
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "papermill", "traitlets", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path
