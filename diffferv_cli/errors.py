"""Errors meant for people.

`UserError` is a mistake in the input or the environment (bad path, not a video, unknown preset, model
not available, disk full): the CLI prints its one sentence and exits with code 2. Anything else is a bug
and keeps its traceback. `Interrupted` is Ctrl-C during a job that kept work for the next run.
"""

from __future__ import annotations


class UserError(Exception):
    """One sentence for the user; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a job: `kept` says in words what finished work the next run reuses
    ("the flow and 120 of 472 encoded frames are kept"), or is None when nothing was kept."""

    def __init__(self, kept: str | None):
        super().__init__(kept)
        self.kept = kept
