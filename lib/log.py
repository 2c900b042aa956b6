"""Logging configured once, for the runner and for each notebook kernel: console plus the daily file
`logs/pipeline_YYYYMMDD.log`, with every secret in force replaced by *** before anything is written,
and control characters (a country's name may hold any) escaped, line breaks kept (lib/terminal.py)."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from lib import redact, terminal
from lib.errors import PipelineError

FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        text = redact.text(message, self.secrets)
        if text != message or record.exc_info:
            if record.exc_info:
                exc_text = redact.text(logging.Formatter().formatException(record.exc_info), self.secrets)
                text = f"{text}\n{exc_text}"
                record.exc_info = None
                record.exc_text = None
            record.msg, record.args = text, None
        return True


class SafeFormatter(logging.Formatter):
    """Lines that cannot act on the terminal showing them (the console, `tail -f` of the file)."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal.safe(super().format(record), newlines=True)


class LogWriteError(PipelineError, OSError):
    """The log file cannot be written (disk full, read-only, /dev/full): lines would be lost."""


_FAILURE: list[str] = []  # why this process's log file stopped taking lines (at most one reason)


def failure() -> str | None:
    """Why this process's log file stopped taking lines, or None: a run whose log lost lines is not
    published (run_pipeline.py)."""
    return _FAILURE[0] if _FAILURE else None


class _FileHandler(logging.FileHandler):
    """A file handler that fails loudly, once: the first line that cannot be written raises
    LogWriteError where it was logged (instead of being dropped with a note on stderr), so a run
    cannot succeed with its log lost; later lines go to the console only (`failure` says why)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _FAILURE:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        err = sys.exc_info()[1]
        message = f"the log file {self.baseFilename} cannot be written: {err}"
        if not _FAILURE:
            _FAILURE.append(message)
        raise LogWriteError(message) from None


def log_file(logs_dir: Path) -> Path:
    return logs_dir / f"pipeline_{datetime.now(timezone.utc):%Y%m%d}.log"


def setup(logs_dir: Path, secrets: list[str] = (), level: int = logging.INFO, stream=None,
          stream_level: int | None = None, stream_format: str = FORMAT) -> Path:
    """Send `lib` and runner logs to the console and the daily file. Safe to call again.
    `stream_level`/`stream_format` quieten the console alone (a notebook shows warnings, the file
    keeps everything). Raises LogWriteError when the file cannot be opened or written."""
    _FAILURE.clear()
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LogWriteError(f"the logs folder {logs_dir} cannot be used: {err}") from None
    path = log_file(logs_dir)
    redacting = RedactSecrets(list(secrets))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_medallion", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(SafeFormatter(stream_format))
    if stream_level is not None:
        console.setLevel(stream_level)
    try:
        file_handler = _FileHandler(path, encoding="utf-8")
    except OSError as err:
        raise LogWriteError(f"the log file {path} cannot be opened: {err}") from None
    file_handler.setFormatter(SafeFormatter(FORMAT))
    for handler in (console, file_handler):
        handler._medallion = True
        handler.addFilter(redacting)
        root.addHandler(handler)
    # One line now, so a file that takes no writes (a full disk) is found before anything runs.
    file_handler.handle(logging.LogRecord(__name__, logging.INFO, __file__, 0, "log opened by pid %s",
                                          (os.getpid(),), None))
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "papermill", "traitlets", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path
