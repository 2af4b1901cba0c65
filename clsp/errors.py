"""One error type for bad user input, shown as a single line by every command."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input or environment that the user can fix.

    It subclasses ``click.ClickException`` so that any command prints ``Error: <message>`` and exits
    with status 1, without a traceback. The message names what is wrong and how to fix it.
    """
