"""The one exception type for bad input: the CLI prints its message on one line and exits 2; and
the one form in which text another party wrote (a silo's error reply) is shown here."""

MAX_FOREIGN_CHARS = 2000
"""Of a message another party sent, kept: a one-line reason, not a flood for the log and terminal."""


class UserError(Exception):
    """Bad input or usage. The message says what was wrong, where, and what to do."""


def foreign_text(text: str, *, limit: int = MAX_FOREIGN_CHARS) -> str:
    """`text` from another party (a silo's error reason), safe to print and log on this machine: one
    line, at most `limit` characters, every non-printable character (terminal escapes, carriage
    returns, newlines, bidirectional overrides) shown as its Python escape, e.g. \\x1b. Printed raw, a
    silo's reply could rewrite the coordinator's terminal (fake or hide lines, set its clipboard)."""
    cut = text[:limit]
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in cut)
    return shown + (f" … ({len(text) - limit} more characters)" if len(text) > limit else "")
