"""Errors caused by the user's input: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Say what is wrong and how to fix it, in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the work in hand was saved; the message says where and how to go on."""
