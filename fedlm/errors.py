"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input or usage. The message says what was wrong, where, and what to do."""
