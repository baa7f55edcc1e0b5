"""Ctrl-C for the `rmdyn` process: every SIGINT ends the command with exit status 130, never a crash or a success.

Two failures this module exists for, both seen on `rmdyn theorem2`:

* **Swallowed.** Python runs a signal handler at the next bytecode boundary of the main thread. When that boundary
  lies inside a garbage-collector callback (JAX registers one, `jax._src.lib._xla_gc_callback`, which runs during
  imports and allocation), the KeyboardInterrupt it raises is "ignored" by the interpreter: printed to stderr and
  dropped, and the command ran to the end and exited 0. `install()` puts a `sys.unraisablehook` in front of
  Python's that re-delivers such a dropped interrupt to the main thread from a helper thread
  (`_thread.interrupt_main` 10 ms later), where it is raised at the next ordinary boundary.
* **Segmentation fault.** A KeyboardInterrupt that arrives while XLA compiles or runs (in its own threads) unwinds
  Python, but the interpreter's shutdown then tears down modules under those threads: exit 139 instead of 130.
  `exit_interrupted()` flushes the standard streams and leaves with `os._exit(130)`, skipping that teardown. Files
  the command writes are written atomically (`dynamics.outputs`), and the unwinding before it removes temporaries, so
  nothing half-written is left.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["INTERRUPTED_STATUS", "exit_interrupted", "install"]

INTERRUPTED_STATUS = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _redeliver_dropped_interrupt(previous_hook: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # Not from here: the hook itself runs where exceptions are dropped. A helper thread re-raises SIGINT
            # in the main thread a moment later, at an ordinary bytecode boundary.
            threading.Timer(0.01, _thread.interrupt_main, args=(signal.SIGINT,)).start()
            return
        previous_hook(unraisable)

    return hook


def install() -> None:
    """SIGINT raises KeyboardInterrupt in the main thread, and one dropped by the interpreter is raised again.

    Call once, in the process's entry point (not from library code: it replaces `sys.unraisablehook`).
    """
    signal.signal(signal.SIGINT, _raise_interrupt)
    sys.unraisablehook = _redeliver_dropped_interrupt(sys.unraisablehook)


def exit_interrupted() -> None:
    """Flush stdout and stderr, then end the process at once with status 130 (no interpreter shutdown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED_STATUS)
