"""lib.log: console plus daily file, with every secret in force replaced by *** before it is written."""

from __future__ import annotations

import io
import logging

import pytest

from lib import log as logsetup

SECRET = "s3cr3t-Value-42"
OTHER = "db-pass%word"


@pytest.fixture
def logged(tmp_path):
    """Logging set up into tmp_path; the handlers are removed again afterwards."""
    root = logging.getLogger()
    level = root.level
    console = io.StringIO()
    path = logsetup.setup(tmp_path / "logs", [SECRET, OTHER, ""], stream=console)
    yield path, console
    for handler in [h for h in root.handlers if getattr(h, "_medallion", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def flushed(path):
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text(encoding="utf-8")


def test_the_log_file_is_daily_and_under_logs_dir(tmp_path, logged):
    path, _ = logged
    assert path.parent == tmp_path / "logs"
    assert path.name.startswith("pipeline_") and len(path.stem) == len("pipeline_YYYYMMDD")


def test_secrets_in_messages_and_arguments_are_replaced(logged):
    path, console = logged
    log = logging.getLogger("lib.test")
    log.info("connecting with key %s", SECRET)
    log.warning(f"password is {OTHER}, key {SECRET}")
    log.info("nothing secret, %d%% plain", 100)
    text = flushed(path)
    for output in (text, console.getvalue()):
        assert SECRET not in output and OTHER not in output
        assert "connecting with key ***" in output
        assert "password is ***, key ***" in output
        assert "nothing secret, 100% plain" in output
    assert " - INFO - lib.test - " in text


def test_secrets_in_exception_tracebacks_are_replaced(logged):
    path, console = logged
    log = logging.getLogger("lib.test")
    try:
        raise RuntimeError(f"cannot connect to postgresql://u:{OTHER}@h/db with {SECRET}")
    except RuntimeError:
        log.exception("load failed")
    text = flushed(path)
    for output in (text, console.getvalue()):
        assert "load failed" in output
        assert "Traceback (most recent call last)" in output
        assert "RuntimeError: cannot connect to postgresql://u:***@h/db with ***" in output
        assert SECRET not in output and OTHER not in output


def test_control_characters_are_escaped_line_breaks_kept(logged):
    path, console = logged
    log = logging.getLogger("lib.test")
    log.warning("run needs attention (%s)", "<html>\r\x1b[2J\x1b[31mEvil\u202eLand")
    try:
        raise ValueError("bad\x1b[0m\nvalue")
    except ValueError:
        log.exception("failed on %s", "Carriage\rReturn")
    for output in (flushed(path), console.getvalue()):
        assert "run needs attention (<html>\\r\\x1b[2J\\x1b[31mEvil\\u202eLand)" in output
        assert "failed on Carriage\\rReturn\nTraceback (most recent call last):" in output
        assert "ValueError: bad\\x1b[0m\nvalue" in output
        assert not any(c in output for c in "\r\x1b\u202e")


def test_setup_again_replaces_its_handlers_instead_of_adding_more(tmp_path, logged):
    path, _ = logged
    logsetup.setup(tmp_path / "logs", [SECRET], stream=io.StringIO())
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_medallion", False)]
    assert len(ours) == 2
    logging.getLogger("lib.test").info("once %s", SECRET)
    assert flushed(path).count("once ***") == 1


def test_noisy_libraries_are_quietened(logged):
    assert logging.getLogger("botocore").level == logging.WARNING
    assert logging.getLogger("urllib3").level == logging.WARNING


def test_redact_filter_alone_leaves_clean_records_untouched():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("text",), None)
    assert logsetup.RedactSecrets([SECRET]).filter(record) is True
    assert record.msg == "plain %s" and record.args == ("text",)
    assert record.getMessage() == "plain text"
