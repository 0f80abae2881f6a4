"""The one function that makes text from files safe to print: key names, provenance, class names, paths and
messages that quote them may hold ANSI/OSC escape sequences (which recolour, retitle or rewrite a terminal), carriage
returns or newlines (which forge lines of output). Every printer of the CLI goes through :func:`printable`."""
from __future__ import annotations

__all__ = ["printable"]


def printable(text: object, *, newlines: bool = False) -> str:
    """``text`` with every character that is not printable (control and format characters, line and paragraph
    separators, ESC, CR, tab, NUL, ...) written as Python's repr writes it (``\\x1b``, ``\\r``, ``\\u202e``); with
    ``newlines``, "\\n" is kept (output whose lines weightspace itself lays out)."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or (newlines and c == "\n") else repr(c)[1:-1] for c in s)
