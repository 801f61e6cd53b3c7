"""SIGINT / SIGTERM during training: the first stops the loop cleanly, a second exits at once.

The first signal sets :attr:`Signals.signum`; the loop checks it after every step (with one
process) and stops within one optimizer step, saving a checkpoint. A second signal ends the
process within milliseconds, without saving (what is on disk stays whole: every file is
written atomically and a checkpoint is only visible once complete), even while the main thread
waits on the device: it is handled by a watcher thread that reads the signal numbers Python's C
handler writes to a wakeup pipe (``signal.set_wakeup_fd``), not by a Python handler, which
would run only once the main thread returns to Python.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """Context manager that owns SIGINT / SIGTERM while training (main thread only; elsewhere inert)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}
        self._old_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> "Signals":
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, _ignore)  # the watcher acts; the default would kill
        self._watcher = threading.Thread(target=self._watch, args=(r,), name="lora-signals", daemon=True)
        self._watcher.start()
        return self

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self._received(signum)

    def _received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\nlora: second {name}: aborted without saving (the last saved checkpoint is intact)",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nlora: {name}: stopping after the step in flight and saving a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        r, w = self._pipe
        os.close(w)  # the watcher reads end-of-file and returns
        self._watcher.join(timeout=1.0)
        os.close(r)
        self._pipe = None


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing to do, the watcher thread has seen the signal."""
