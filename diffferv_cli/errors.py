"""Errors meant for people.

`UserError` is a mistake in the input or the environment (bad path, not a video, unknown preset, model
not available, disk full): the CLI prints its one sentence and exits with code 2. Anything else is a bug
and keeps its traceback. `Interrupted` is Ctrl-C during a job that kept work for the next run.
`os_errors(action, path)` turns an operating system's failure (disk full, EFBIG, read-only, permissions, a
link loop, a folder where a file was expected) into one such sentence naming the path and the action.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


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


# Why an operating-system call failed, in words (errno -> reason), for the errors people cause or meet:
# a full or read-only disk, a size limit, permissions, links, a file where a folder was expected.
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file grew past the largest this process may write (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (or a folder on the way may not be searched)",
    errno.EPERM: "the operation is not permitted",
    errno.ELOOP: "a symbolic link loop",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ENOENT: "it does not exist",
    errno.EIO: "an input/output error (a failing disk or network file system)",
    errno.EMFILE: "too many open files",
}

# What the user can do about it, when the reason alone does not say.
_HINTS = {errno.ENOSPC: "free some space or write to another disk (--cache-dir, -o)",
          errno.EDQUOT: "free some space or write to another disk (--cache-dir, -o)",
          errno.EFBIG: "raise the limit or write less (fewer --frames)"}


def os_reason(err: OSError) -> str | None:
    """The reason of `err` in words, or None when it is not one of the failures above (then it is a bug)."""
    return _REASONS.get(err.errno)


def os_error_message(err: OSError, action: str, path=None, hint: str = "") -> str:
    """One sentence: "Cannot <action> <path>: <reason>; <hint>." (`path` defaults to the error's own; `hint`
    is the advice unless the failure has its own, as a full disk does)."""
    where = path if path is not None else (err.filename or "")
    reason = os_reason(err) or (err.strerror or type(err).__name__).lower()
    hint = _HINTS.get(err.errno) or hint  # the errno's own advice first (disk full: free some space)
    return f"Cannot {action} {where}: {reason}" + (f"; {hint}" if hint else "") + "."


@contextlib.contextmanager
def os_errors(action: str, path=None, hint: str = "") -> Iterator[None]:
    """Turn an `OSError` raised in the block into a `UserError` (`os_error_message`)."""
    try:
        yield
    except UserError:
        raise
    except OSError as err:
        raise UserError(os_error_message(err, action, path, hint)) from None
