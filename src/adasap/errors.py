"""The one exception type that reaches users as a clean, one-line message."""

import reprlib
from typing import Any

# a bad value as messages quote it: reprlib stops early, so a huge value is never formatted whole
_QUOTE = reprlib.Repr()  # attributes, not arguments: Python 3.10 and 3.11 take none
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 2, 40, 40
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 4


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits with code 2.

    Messages name the problem and the fix in one line, e.g.
    ``unknown dataset 'fmnist': choose one of fashion-mnist, mnist, ...``.
    """


def exception_reason(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message on one line, cut to ``limit`` characters (or its type)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def exception_summary(exc: BaseException) -> str:
    """``Type: message`` on one line, cut to 200 characters."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def quote(value: Any) -> str:
    """``repr(value)`` cut short (``...``) for a message: a long list or string, however big,
    costs a few dozen characters."""
    return _QUOTE.repr(value)
