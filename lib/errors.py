"""One base for every error the pipeline raises on purpose, so callers catch one type.

Each module keeps its specific errors (``config.ConfigError``, ``storage.StorageError``, ...) as
subclasses of ``PipelineError``; the message always says what was wrong and what (not) to do next.
"""

from __future__ import annotations

# What `run_pipeline.py` exits with: 0 success, 1 a stage or preflight failed, 2 bad arguments or
# configuration (nothing ran), 3 another run holds the pipeline lock, 130 interrupted.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class PipelineError(RuntimeError):
    """Something the pipeline checked went wrong; the message says what, and what was (not) written.
    `exit_code` is what the runner exits with when this ends a command: EXIT_FAILED unless a subclass
    says otherwise (EXIT_USAGE for bad input or configuration, where nothing ran; EXIT_LOCKED for a
    busy lock)."""

    exit_code = EXIT_FAILED
