"""One error type for bad input, and the one boundary where every command turns errors into a line.

Library code raises ``UserError`` (a ``ValueError``: usable without click, catchable by callers). The
command classes below are the only place that converts it, an ``OSError`` (permission, full disk, a path
under a file) or an error re-raised from a DataLoader worker into ``Error: <message>`` on one line and
exit status 1, without a traceback. A command-line mistake click itself finds (``--steps nan`` for an
integer, an unknown option) is the same one line, without the usage block, and keeps click's status 2.
"""

from __future__ import annotations

import errno
import os

import click

SETTINGS = {"show_default": True, "help_option_names": ["-h", "--help"]}


class UserError(ValueError):
    """Bad input or environment that the user can fix; the message names what and how."""


_OS_HINTS = {
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the filesystem is read-only; choose a writable path",
    errno.ENOSPC: "the disk is full; free space or choose another path",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "the path is a directory where a file was expected; choose another path",
    errno.EEXIST: "a file is where a directory is needed; choose another path",
    errno.ENOENT: "the path does not exist; check it",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
}


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line (a DataLoader worker's re-raised error keeps only its own)."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.errno is not None:
        where = error.filename if error.filename is not None else "?"
        hint = _OS_HINTS.get(error.errno, "check the path and the disk")
        return f"{os.strerror(error.errno)} ({where}): {hint}"
    text = str(error)
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "Caught X in DataLoader worker ...\n<trace>\nX: msg"
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def _usage_line(error: click.UsageError) -> click.ClickException:
    """click's usage error as a plain one-line error with the same exit status."""
    line = click.ClickException(" ".join(error.format_message().split()))
    line.exit_code = error.exit_code
    return line


def _boundary(invoke):
    def wrapped(self, ctx: click.Context):
        try:
            return invoke(self, ctx)
        except click.UsageError as error:  # an unknown subcommand of a group
            raise _usage_line(error) from None
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except (UserError, OSError) as error:
            raise click.ClickException(one_line(error)) from None

    return wrapped


def _parsing(make_context):
    def wrapped(self, info_name, args, parent=None, **extra):
        try:
            return make_context(self, info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            raise _usage_line(error) from None

    return wrapped


class Command(click.Command):
    """A click command whose errors from the library end as one line (see the module docstring)."""

    invoke = _boundary(click.Command.invoke)
    make_context = _parsing(click.Command.make_context)


class Group(click.Group):
    """A click group whose subcommands are ``Command``s."""

    command_class = Command
    group_class = type
    invoke = _boundary(click.Group.invoke)
    make_context = _parsing(click.Group.make_context)


class ShardError(UserError):
    """A shard directory, shard or record that is malformed, damaged or unsafe to read; names the file."""


class LockError(UserError):
    """A lock or temporary file that cannot be used safely (e.g. a symlink planted in its place)."""
