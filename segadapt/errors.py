"""One-line errors at the command line: the handler shared by every entry point.

Bad input (a case file, a config key, a checkpoint, a path) is a user error: the command prints
``error: <message>`` on stderr, one line, and exits with code 2. Anything else is a bug and keeps its
traceback. ``SEGADAPT_DEBUG=1`` prints the traceback of user errors too.

The message is the package's own: libraries wrap errors raised inside them (MONAI raises
``RuntimeError: applying transform <...>`` from a transform's :class:`~segadapt.data.loading.CaseError`),
so the handler walks the exception chain (``__cause__`` / ``__context__``) to the first user error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, NoReturn, Optional, TypeVar

import tqdm
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

EXIT_CODE = 2
DEBUG_ENV = "SEGADAPT_DEBUG"

# ValueError covers CaseError and the checkpoint errors of segadapt.models.pretrained; OSError the missing,
# unreadable or unwritable files; re.error an invalid module pattern; Hydra / OmegaConf the config errors.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, re.error, HydraException, OmegaConfBaseException)

F = TypeVar("F", bound=Callable[..., Any])


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from or while handling, outermost first (cycles cut)."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def user_error(error: BaseException) -> Optional[BaseException]:
    """The user error behind `error` (itself, or the first one in its chain), or None for a bug."""
    return next((e for e in _chain(error) if isinstance(e, USER_ERRORS)), None)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (lines joined with ' / '; the type name when it has none)."""
    if isinstance(error, re.error) and error.pattern is not None:
        text = f"invalid regular expression {error.pattern!r}: {error}"
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"  # str() would add '[Errno 2]'
    else:
        text = str(error).split("\nConfig search path")[0]  # Hydra: a missing config lists its search path
        if isinstance(error, HydraException) and isinstance(error.__cause__, OmegaConfBaseException):
            text = f"{text.splitlines()[0]} {str(error.__cause__).splitlines()[0]}"  # 'Could not override x.' + why
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines) or type(error).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error raised inside the block into ``error: <message>`` on stderr and exit code 2."""
    try:
        yield
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(error)
        sys.stdout.flush()
        print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
        _let_threads_finish()
        raise SystemExit(EXIT_CODE) from None


def _let_threads_finish(timeout_s: float = 5.0) -> None:
    """Wait (at most `timeout_s` in all) for the other threads to end before the interpreter shuts down.

    A failed item of MONAI's ``CacheDataset`` leaves its ThreadPool worker (a daemon thread) running the
    next item; exiting under it aborts the process in torch's C++ code ("terminate called without an
    active exception", exit code 134 instead of 2). tqdm's monitor thread (started by the first progress bar,
    it only tunes the refresh of slow bars) never ends by itself: it is stopped first, else every error after a
    bar would wait the whole `timeout_s`."""
    monitor = getattr(tqdm.tqdm, "monitor", None)
    if monitor is not None:
        monitor.exit()
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def exits_on_user_error(func: F) -> F:
    """Decorator form of :func:`user_errors` for a command's main function."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors follow the convention: ``error: <prog>: <message>`` on
    one line and exit code 2, instead of the usage text followed by the message."""

    def error(self, message: str) -> NoReturn:
        sys.stdout.flush()
        self.exit(EXIT_CODE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")
