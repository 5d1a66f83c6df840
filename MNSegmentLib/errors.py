"""Errors that the command line turns into exit codes."""


class InputError(Exception):
    """Bad user input: the CLI prints the message and exits with code 2.

    The message must name the offending file or setting and say what to do.
    """


class Cancelled(Exception):
    """Training was asked to stop (SIGTERM/SIGINT) and has saved a checkpoint: exit code 3."""
