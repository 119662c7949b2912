"""Errors caused by the user's input: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Say what is wrong and how to fix it, in one line."""
