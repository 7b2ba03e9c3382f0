"""A background worker that always computes the LATEST request: a request submitted while another
runs replaces any still waiting (a slider dragged across five positions costs at most two
computations, not five), and the kernel stays free to receive the next control change. With a
`delay`, a request starts only once no newer one arrived for `delay` seconds (a debounce): a burst of
control changes is computed once, for its last state."""
from __future__ import annotations

import threading
import time
from typing import Callable, Hashable


class LatestWorker:
    """Runs `fn(request)` on one daemon thread, newest request first, older waiting ones dropped.

    `fn` must catch its own errors (an exception escaping it is kept in `errors` and the worker goes on).
    `pending` and `running` tell what is queued and what is being computed now; `delay` (seconds) is the
    quiet time a request waits for a newer one before it starts."""

    def __init__(self, fn: Callable[[Hashable], None], name: str = "mtlab-worker", delay: float = 0.0):
        self.fn, self.name, self.delay = fn, name, delay
        self._submitted = 0.0
        self.pending = self.running = None
        self.errors: list[BaseException] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, request: Hashable) -> None:
        with self._cv:
            self.pending = request
            self._submitted = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return self.pending is None and self.running is None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False if `timeout` seconds passed first."""
        with self._cv:
            return self._cv.wait_for(lambda: self.pending is None and self.running is None, timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self.pending is None:   # nothing left: end the thread (submit starts a new one)
                    self._thread = None
                    self._cv.notify_all()
                    return
                quiet = self._submitted + self.delay - time.monotonic()
                if quiet > 0:   # a newer request may still come: wait for the burst to end
                    self._cv.wait(quiet)
                    continue
                self.running, self.pending = self.pending, None
            try:
                self.fn(self.running)
            except BaseException as e:  # noqa: BLE001 - kept for the caller, the thread must survive
                self.errors.append(e)
            finally:
                with self._cv:
                    self.running = None
                    self._cv.notify_all()
