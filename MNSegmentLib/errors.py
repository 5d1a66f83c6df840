class InputError(Exception):
    """Bad user input: the CLI prints the message and exits with code 2."""
