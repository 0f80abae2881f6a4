"""One line for bad input: what libraries log or warn during a command is held back, and shown only when the
command does not end in a weightspace error (then the error line is all that is printed)."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

__all__ = ["held_output", "one_line"]


class _Hold(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records[-4:]):  # seen by two held loggers on its way up
            self.records.append(record)


def _writes_to_stderr(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)


@contextlib.contextmanager
def held_output() -> Iterator[dict]:
    """Hold log records (root and any logger with its own stderr handler, e.g. huggingface_hub's retries, torch's,
    open_clip's 'ERROR:root:' lines) and warnings while the block runs. The block sets ``state["failed"] = True``
    to drop them; otherwise they are replayed on stderr when it ends."""
    hold = _Hold()
    swapped: list[tuple[logging.Logger, logging.Handler]] = []
    # huggingface_hub's logger prints straight to stderr from the moment it is imported: import it now (~0.1 s, no
    # torch) so that its handler is among those held. torch's is held when torch is already imported.
    with contextlib.suppress(Exception):
        __import__("huggingface_hub.utils.logging")
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            if _writes_to_stderr(h):
                lg.removeHandler(h)
                swapped.append((lg, h))
        if lg is logging.getLogger() or any(x[0] is lg for x in swapped):
            lg.addHandler(hold)
    state = {"failed": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield state
        finally:
            for lg in loggers:
                if hold in lg.handlers:
                    lg.removeHandler(hold)
            for lg, h in swapped:
                lg.addHandler(h)
    if not state["failed"]:
        from weightspace.report.terminal import printable
        for record in hold.records:  # messages may quote file contents: replayed with control characters escaped
            record.msg, record.args = printable(record.getMessage(), newlines=True), None
            logging.getLogger(record.name).handle(record)
        for w in caught:
            warnings.showwarning(printable(str(w.message), newlines=True), w.category, w.filename, w.lineno)


def one_line(text: str) -> str:
    """``text`` on one line: newlines and other control characters escaped as repr would write them."""
    from weightspace.report.terminal import printable
    return printable(text)
