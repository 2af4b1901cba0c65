"""One error type for bad input, and the one boundary where every command turns errors into a line.

Library code raises ``UserError`` (a ``ValueError``: usable without click, catchable by callers). The
command classes below are the only place that converts it, an ``OSError`` on a path (permission, full
disk, a path under a file) or such an error re-raised from a DataLoader worker into ``Error: <message>``
on one line and exit status 1, without a traceback. A command-line mistake click itself finds (``--steps
nan`` for an integer, an unknown option) is the same one line, without the usage block, and keeps click's
status 2. Any other exception is a bug in clsp: one line says so and how to see its traceback, which
``--verbose`` (on every command) or ``CLSP_DEBUG=1`` shows by re-raising every error unchanged. The
boundary also sets up logging (``clsp.log``) once per process.
"""

from __future__ import annotations

import errno
import os
import reprlib
from typing import Any

import click

from clsp.log import setup_logging

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


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 60, 40, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdeque = 4


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` of at most ``limit`` characters, for quoting input in a message: only the quoted part of
    a value is formatted, so a huge or self-multiplying value (YAML aliases) costs no time or memory."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_path(path: Any, limit: int = 80) -> str:
    """A path of at most ``limit`` characters for a message: its start and its end (the file's own name) kept."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2 - 2]}...{text[-(limit - limit // 2 - 1):]}"


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line (a DataLoader worker's re-raised error keeps only its own)."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.errno is not None:
        where = short_path(error.filename) if error.filename is not None else "?"
        hint = _OS_HINTS.get(error.errno, "check the path and the disk")
        if error.errno == errno.EEXIST and error.filename is not None and os.path.islink(error.filename) \
                and not os.path.exists(error.filename):
            hint = "it is a symbolic link to nothing; remove it, or point it at a directory"
        return f"{os.strerror(error.errno)} ({where}): {hint}"
    text = str(error)
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "Caught X in DataLoader worker ...\n<trace>\nX: msg"
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def _usage_line(error: click.UsageError) -> click.ClickException:
    """click's usage error as a plain one-line error with the same exit status (a missing required option says
    that it is required, and what it is)."""
    line = type("UsageLine", (click.ClickException,), {"exit_code": error.exit_code})
    if isinstance(error, click.MissingParameter) and isinstance(error.param, click.Option):
        what = " ".join((error.param.help or "").split())
        return line(f"{error.param.opts[0]} is required" + (f": {what}" if what else ""))
    return line(" ".join(error.format_message().split()))


DEBUG_ENV = "CLSP_DEBUG"
_VERBOSE = "clsp.verbose"


def debugging(ctx: click.Context | None = None) -> bool:
    """True when errors should keep their traceback: ``--verbose`` given or ``CLSP_DEBUG`` set (not 0)."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or bool(ctx is not None and ctx.meta.get(_VERBOSE))


def _is_user_error(error: Exception) -> bool:
    """Bad input or environment: a ``UserError``, or an ``OSError`` about a path (not one from our own logic)."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        return error.errno is not None or error.filename is not None
    return isinstance(error, UserError)


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_VERBOSE] = True


_VERBOSE_OPTION = click.Option(["--verbose"], is_flag=True, expose_value=False, callback=_set_verbose,
                               help="Show the full traceback of any error (as does CLSP_DEBUG=1).")


def _with_verbose(get_params):
    """The command's options, plus ``--verbose`` where it is the top-level command (``clsp``, ``clsp-train``)."""

    def wrapped(self, ctx: click.Context) -> list[click.Parameter]:
        params = get_params(self, ctx)
        return params if ctx.parent is not None else [*params, _VERBOSE_OPTION]

    return wrapped


def _boundary(invoke):
    def wrapped(self, ctx: click.Context):
        setup_logging()
        try:
            return invoke(self, ctx)
        except click.UsageError as error:  # an unknown subcommand of a group
            raise _usage_line(error) from None
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except Exception as error:
            if debugging(ctx):
                raise
            if _is_user_error(error):
                raise click.ClickException(one_line(error)) from None
            raise click.ClickException(
                f"internal error, a bug in clsp: {type(error).__name__}: {one_line(error)} "
                f"(run again with {DEBUG_ENV}=1 or --verbose to see the traceback, and report it)") from None

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

    get_params = _with_verbose(click.Command.get_params)
    invoke = _boundary(click.Command.invoke)
    make_context = _parsing(click.Command.make_context)


class Group(click.Group):
    """A click group whose subcommands are ``Command``s."""

    command_class = Command
    group_class = type

    get_params = _with_verbose(click.Group.get_params)
    invoke = _boundary(click.Group.invoke)
    make_context = _parsing(click.Group.make_context)


class ShardError(UserError):
    """A shard directory, shard or record that is malformed, damaged or unsafe to read; names the file."""


class LockError(UserError):
    """A lock or temporary file that cannot be used safely (e.g. a symlink planted in its place)."""
