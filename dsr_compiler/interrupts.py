"""Ctrl-C is never swallowed or reported as the user's error.

Libraries under the compiler sometimes lose a KeyboardInterrupt: torch.fx records a stack for
every traced node through a C++ helper that lazily imports torch._inductor / torch._dynamo, and
a Ctrl-C landing in that import is swallowed by the C++ layer, leaving half-imported modules
behind. The trace then either finishes as if nothing happened or fails later with an unrelated
"AttributeError: partially initialized module 'torch._dynamo'...", which used to be reported as
the user's forward() failing. `watch_interrupts()` notes every SIGINT that arrives inside it (then
raises KeyboardInterrupt as usual) and, on leaving, turns whatever happened after a noted SIGINT
(an error or a normal return) into KeyboardInterrupt. Used by frontend.tracer and the CLI.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Callable


class watch_interrupts:
    """Context manager: a SIGINT inside the block always ends it with KeyboardInterrupt.

    A no-op outside the main thread (only it receives signals) and when SIGINT is ignored or left
    to the OS default; nests (each level chains to the handler it replaced)."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Callable[[int, FrameType | None], Any] | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.hit = True
        old = self._old
        if callable(old):
            old(signum, frame)         # default_int_handler or an outer watch: raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> "watch_interrupts":
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if callable(old):
                self._old = old
                signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        if self.hit and not (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)):
            raise KeyboardInterrupt from exc   # swallowed below us: report the interrupt, not the aftermath
        return False
