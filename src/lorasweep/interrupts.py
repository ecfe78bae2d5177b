"""SIGTERM handled like Ctrl-C.

SLURM and most schedulers send SIGTERM before they kill a job. Python's default action ends the
process on the spot, so the MLflow run would stay RUNNING forever. Raised as an exception instead,
it unwinds like a KeyboardInterrupt: the run ends KILLED with its reason, checkpoints already
written stay (a rerun of the same command resumes from the last complete one), and the process
exits with one line and the shell's code for the signal (`lorasweep.cli.harness`).

Python runs a signal's handler between two bytecodes of the main thread. When those belong to a
weakref callback or a `__del__` (garbage collection, mid-step), the raised exception is printed
as "Exception ignored in ..." and dropped, and training would go on to exit 0. So the handlers
also record the signal, and `raise_if_signalled` (called after every training step and
evaluation) raises it again.
"""

from __future__ import annotations

import signal
import threading

from lorasweep.errors import one_line


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` on the
    way up (Hydra's job runner, a library) takes it for an ordinary error."""


_received: BaseException | None = None  # the first handled signal's exception


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (where signals arrive), and
    Ctrl-C raises KeyboardInterrupt as before; both are recorded for `raise_if_signalled`. A
    Ctrl-C that Python ignores (a job started in the background) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise _record(Terminated("SIGTERM"))


def _on_sigint(signum, frame) -> None:
    raise _record(KeyboardInterrupt())


def _record(exc: BaseException) -> BaseException:
    global _received
    if _received is None:
        _received = exc
    return exc


def raise_if_signalled() -> None:
    """Raise the first handled signal's exception again: a no-op unless a signal came, and then
    the run is stopping anyway (the first raise either unwound it or was swallowed)."""
    if _received is not None:
        raise _received


def is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, Terminated))


def run_status(exc: BaseException) -> str:
    """The MLflow status of a run that ended with `exc`."""
    return "KILLED" if is_interrupt(exc) else "FAILED"


def failure_reason(exc: BaseException) -> str:
    """The failure_reason tag: never empty (a KeyboardInterrupt has no message)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, Terminated):
        return "interrupted (SIGTERM)"
    return one_line(exc)[:5000] or type(exc).__name__
