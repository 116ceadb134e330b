"""Stopping cleanly on a signal: Ctrl-C (SIGINT) and SIGTERM (timeout, SLURM preemption,
docker stop, Kubernetes) set a flag that the training loop reads after each step (ranks under
torchrun on GPUs agree on it at the loss checks), so it can save a checkpoint before it stops;
loader workers leave the signals to it."""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

# What stops a run with a checkpoint: Ctrl-C, and SIGTERM (timeout, SLURM preemption,
# docker stop, Kubernetes).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C, after the one that asked for a checkpoint: the run stopped mid-step,
    where Python's own handler would have raised a KeyboardInterrupt."""


def _stop_at_once(signum: int, frame: object) -> None:
    raise StoppedAtOnce


class StopFlag:
    """The first SIGINT or SIGTERM sets the flag (the loop saves a checkpoint after the step in
    progress, or on GPU ranks at the next loss check, and stops); a second Ctrl-C gets the
    handler that was there before (stop at once). A repeated SIGTERM changes nothing: under
    torchrun a worker gets one from the scheduler and another forwarded by torchrun, moments
    apart; what stops at once after a grace period is the scheduler's SIGKILL."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # under torchrun, rank 0 alone says what happens
        self.raised = False
        self.signal_number = signal.SIGINT
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.raised:  # a repeated SIGTERM (a Ctrl-C gets the previous handler)
            return
        self.raised, self.signal_number = True, signum
        previous = self._previous[signal.SIGINT]
        signal.signal(signal.SIGINT, _stop_at_once if previous is signal.default_int_handler
                      else previous)  # ignored in a background job, say: still ignored
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a "
                  "checkpoint (Ctrl-C again to stop at once)", flush=True)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back in this thread (and delivered on leaving), and in the
    processes it starts meanwhile until they release them (release_stop_signals): a spawned
    process has Python's default handlers until its own code can install others, and a pool
    process that died of a signal then would break its pool."""
    if not hasattr(signal, "pthread_sigmask"):  # not on Windows
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def release_stop_signals() -> None:
    """In a process started under stop_signals_held, once its handlers are installed: the
    signals held back reach them now."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def loader_worker_init(worker_init: Callable | None) -> Callable[[int], None]:
    """A loader's worker_init_fn: its workers ignore Ctrl-C and SIGTERM (SLURM signals every
    process of a job), since a worker that died would make the DataLoader raise in the main
    process mid-step; the main process decides when to stop and ends its workers itself
    (shut_down_workers). They also take the main process's warning filters as they are now (a
    rank other than 0 shows only its own files' warnings): forked workers inherit them, spawned
    ones (macOS, Python 3.14's forkserver, a run in `canon reproduce --jobs`'s spawned
    processes) would start from Python's defaults. A partial of a module function, not a
    closure, since spawned workers are sent it pickled."""
    return functools.partial(_as_a_loader_worker, list(warnings.filters), worker_init)


def _as_a_loader_worker(warning_filters: list[tuple], worker_init: Callable | None,
                        worker_id: int) -> None:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    warnings.resetwarnings()
    for action, message, category, module, line in reversed(warning_filters):  # each goes first
        warnings.filterwarnings(action, _pattern(message), category, _pattern(module), line)
    if worker_init is not None:
        worker_init(worker_id)


def _pattern(matched: re.Pattern | str | None) -> str:
    """A filter's message or module as the pattern filterwarnings takes: a plain string
    (Python's own filters hold module names so) matches itself whole."""
    if matched is None:
        return ""
    return matched.pattern if isinstance(matched, re.Pattern) else re.escape(matched) + r"\Z"


def shut_down_workers(loader: Any) -> None:
    """End a loader's persistent worker processes now. They ignore SIGTERM, which is how
    multiprocessing ends leftover workers when the interpreter exits (it would wait forever)."""
    loader = getattr(loader, "loader", loader)  # on-device decoding wraps its DataLoader
    iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
