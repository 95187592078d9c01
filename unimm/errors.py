"""Errors that reach the user as one line.

Anything raised as a ``UserError`` is caught by the CLI, printed as ``unimm <command>: error: <message>``
and turned into exit code 2, without a traceback. The message must say what is wrong and what to do.
"""


class UserError(Exception):
    """Bad input from the user (file, flag, config value): reported in one line, exit code 2."""


class ConfigError(UserError):
    """An unknown, mistyped or ill-typed configuration key or value."""
