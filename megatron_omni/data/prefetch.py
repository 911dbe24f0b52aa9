"""Background prefetch of one stream's microbatches, without giving up exact resume.

A producer thread builds microbatches ahead into a bounded queue; each item carries the stream's
state *after* it was built.  The consumer remembers the state of the last microbatch it took, so
`state_dict()` is the position before the first unconsumed microbatch however far the thread has
run ahead.  `load_state_dict()` stops the thread, drops what it built and restarts from the
restored position; `pause()` stops the thread (before a fork) but keeps what it built, so a
checkpoint costs no re-decoding.  Decoding (PIL, torchaudio, DALI) releases the GIL, so the thread overlaps
with the training step.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import deque
from typing import Any, Deque, Dict, Optional, Protocol

__all__ = ["PrefetchingStream"]


class _Stream(Protocol):
    def next_microbatch(self) -> Any: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def settle(self) -> None:
        """Wait until no helper thread of the stream is running (nothing in flight)."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PrefetchingStream:
    def __init__(self, stream: _Stream, depth: int, name: str = "stream"):
        self.stream = stream
        self.depth = depth
        self.name = name
        self._consumed_state = stream.state_dict()
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        # Built by a paused thread and not yet consumed, in order: (microbatch, state after it).
        self._kept: Deque[Any] = deque()
        self._unqueued: Optional[Any] = None  # the item the thread held when it was stopped

    # The producer owns `self.stream` while it runs; nothing else touches the stream then.
    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item: Any = (self.stream.next_microbatch(), self.stream.state_dict())
            except BaseException as exc:  # handed to the consumer, raised there
                item = _Failure(exc)
            while True:
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    if stop.is_set():  # kept for `pause()`: the stream has already moved past it
                        self._unqueued = item
                        return
            if isinstance(item, _Failure):
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce, args=(self._queue, self._stop), name=f"prefetch-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and drop what it built (the stream is then ahead of the consumer)."""
        self._halt()
        self._kept.clear()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            while not self._queue.empty():
                self._kept.append(self._queue.get_nowait())
            if self._unqueued is not None:
                self._kept.append(self._unqueued)
                self._unqueued = None
            self._thread = self._queue = None
        self.stream.settle()

    def pause(self) -> None:
        """Stop every thread (a fork taken while a decoding thread holds a lock -- DALI, torch,
        malloc -- deadlocks the child) and keep what was built: the next requests take it first,
        then the thread restarts where the stream stands, so the microbatch sequence is unchanged."""
        self._halt()

    def next_microbatch(self) -> Any:
        if self._kept:
            item = self._kept.popleft()
        elif self.depth <= 0:
            batch = self.stream.next_microbatch()
            self._consumed_state = self.stream.state_dict()
            return batch
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
        if isinstance(item, _Failure):
            self.stop()
            raise item.exc
        batch, self._consumed_state = item
        return batch

    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._consumed_state)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stop()
        self.stream.load_state_dict(state)
        self._consumed_state = self.stream.state_dict()
