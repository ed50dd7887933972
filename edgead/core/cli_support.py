"""What every edgead command line shares: argument types that refuse nonsense at parse time, and
one-line errors (the traceback only with ``--debug``).

Torch-free and dependency-free, so ``edgead-run`` and ``edgead`` both use it.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, TextIO

DEBUG_HINT = "rerun with --debug for the traceback"


class UsageError(ValueError):
    """Bad command-line usage (exit code 2); the message says what to give instead."""


# -- argument types -------------------------------------------------------------------------------

def _number(kind: type, text: str) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; ``what`` explains a special low value."""

    def parse(text: str) -> int:
        value = int(_number(int, text))
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{what}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its message
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = float(_number(float, text))
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = float(_number(float, text))
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


positive_int = int_at_least(1)
positive_int.__name__ = "positive integer"
loop_count = int_at_least(-1, " (-1 = forever)")
loop_count.__name__ = "loop count"


# -- one-line errors ------------------------------------------------------------------------------

def one_line(error: BaseException) -> str:
    """The error's message on one line: a KeyError's quotes dropped, further lines cut (they are
    help text; the first line names the file or device and the fix)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] + (" (see --help)" if len(lines) > 1 else "")


def report(prog: str, error: BaseException, debug: bool, internal: bool = False,
           stream: TextIO | None = None) -> None:
    """Print ``prog: error: <one line>``; an internal (unexpected) error also names its type and
    how to get the traceback. With ``debug`` the traceback is printed first."""
    out = stream or sys.stderr
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=out)
    message = one_line(error)
    if internal:
        message = f"internal error: {type(error).__name__}: {message}" + ("" if debug else f" ({DEBUG_HINT})")
    print(f"{prog}: error: {message}", file=out, flush=True)


def pop_flag(argv: list[str], flag: str) -> tuple[list[str], bool]:
    """``argv`` without ``flag`` (anywhere before a ``--``), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = flag in argv[:end]
    return [a for i, a in enumerate(argv) if not (i < end and a == flag)], found


# -- the `edgead` command's exit codes ------------------------------------------------------------

EDGEAD_EPILOG = """\
exit codes:
  0    done
  1    internal error (a bug: rerun with --debug and report the traceback)
  2    bad usage: a bad argument, an unknown detector, an --out that holds a run (--resume/--overwrite)
  3    bad input data: a missing or unreadable data set, image, mask or file (the message names it)
  4    a run or bundle that cannot be used (not a run, not a bundle, checksums, export failed)
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
Every error is one line naming the file or device and the fix; --debug adds the traceback.
"""

# By class name along the exception's MRO, so that classifying needs no import of torch or of
# the modules that define them.
_CODES = {
    "UsageError": 2, "ArgumentTypeError": 2, "ArgumentError": 2,
    "DatasetError": 3, "ImageError": 3, "SourceError": 3, "FileNotFoundError": 3, "NotADirectoryError": 3,
    "IsADirectoryError": 3, "PermissionError": 3,
    "CheckpointError": 4, "BundleError": 4, "BundleRefused": 4, "ExportError": 4, "EngineError": 4,
}
_PACKAGE_DIRS = tuple(os.sep + name + os.sep for name in ("edgead", "export"))


def exit_code_for(error: BaseException) -> tuple[int, bool]:
    """(exit code, internal?) of an exception that ended an ``edgead`` command.

    Known edgead errors have their code; a ValueError/RuntimeError/OSError raised by edgead's own
    code is a user-facing error (2, or 3 for files); anything else is an internal error (1).
    """
    for cls in type(error).__mro__:
        if cls.__name__ in _CODES:
            return _CODES[cls.__name__], False
    if isinstance(error, KeyError) and _raised_in_package(error):
        return 2, False  # e.g. an unknown name looked up in a registry, with its own message
    if isinstance(error, OSError):
        return 3, False
    if isinstance(error, (ValueError, RuntimeError)) and _raised_in_package(error):
        return 2, False
    return 1, True


def _raised_in_package(error: BaseException) -> bool:
    tb = error.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and any(d in last.tb_frame.f_code.co_filename for d in _PACKAGE_DIRS)


def fail(prog: str, error: BaseException, debug: bool, stream: TextIO | None = None) -> int:
    """Report ``error`` as one line (see :func:`report`) and return its exit code."""
    code, internal = exit_code_for(error)
    report(prog, error, debug, internal=internal, stream=stream)
    return code
