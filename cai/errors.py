"""One error type for bad input, so the command line can print one clear line instead of a traceback,
and the one exception a signal raises, so an interrupted run stops where it is and says so."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterable, Iterator


class CaiError(Exception):
    """Bad input or an unusable setting. The message names the file or field and says how to fix it.

    `exit_code` is what the command line exits with: 1, or 128 + the signal's number for an interruption.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """A signal (SIGTERM, SIGINT, SIGHUP) stopped the run.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it, and not
    KeyboardInterrupt or SystemExit, which Lightning turns into an exit of its own (SIGTERM into a
    `SystemExit` with no code: success).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGINT and SIGHUP raise Interrupted; the old handlers come back after.

    Lightning's Trainer adds its own SIGTERM handler in front of this one during `fit` and calls it
    too, so the signal stops training at once instead of at Lightning's next check.
    """

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal that arrives inside the block is acted on when the block ends, so what the block
    writes (a checkpoint) is written whole. Raised mid-write, the exception would surface from inside
    torch's zip writer as a RuntimeError, and leave a torn temporary file.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:  # now, as if it had arrived here: Lightning's and cai's handlers, or the default action
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def disk_full(err: BaseException) -> bool:
    """An OSError that means no space (or no quota) is left where it wrote."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def check_choice(field: str, value: str, choices: Iterable[str]) -> None:
    """One clear line for a config field set to something it does not take."""
    if value not in choices:
        raise CaiError(f"{field}: choose {', '.join(choices)}, got '{value}'")
