"""Lazy copies of training state into host memory, overlapped with the next forward and backward.

DataStates-LLM's observation: between two optimizer steps the parameters and optimizer state do not
change, so a snapshot taken at a step boundary can be copied while the next forward and backward
run, and training only has to wait, before the next optimizer step, for copies not yet finished.
``LazyCopy`` holds one snapshot's copies; a background thread works through them in order and a
caller that needs some tensors before the thread reaches them copies those itself (``wait``), so
the wait for one parameter's state costs that state's copy at most. CUDA sources are copied on a
side stream into page-locked host memory; waiting then only orders the caller's stream after the
copy (no host sync), and the thread syncs the side stream before reporting the snapshot complete.
"""

import os
import threading
from collections.abc import Callable, Iterable
from queue import SimpleQueue

import torch

from ..errors import UserError

_PENDING, _ISSUED = 0, 1


class LazyCopy:
    """The background copies of one snapshot: ``(source, destination)`` pairs of equal shape.

    Sources must stay unmodified until ``wait`` covering them returns. ``on_complete`` runs on the
    copier thread once every copy has landed in host memory (used to commit the snapshot).
    """

    def __init__(self, copies: list[tuple[torch.Tensor, torch.Tensor]], on_complete: Callable[[], None]) -> None:
        self.copies = copies
        self.on_complete = on_complete
        self._state = [_PENDING] * len(copies)
        self._events: list = [None] * len(copies)
        self._by_storage: dict[int, list[int]] = {}
        for index, (source, _) in enumerate(copies):
            self._by_storage.setdefault(_storage_key(source), []).append(index)
        self._lock = threading.Condition()
        self._next = 0
        self._issued = 0
        self._completed = False
        self._error: BaseException | None = None
        self._cuda = any(source.is_cuda for source, _ in copies)
        self._stream = None
        if self._cuda:
            device = next(source.device for source, _ in copies if source.is_cuda)
            self._stream = _side_stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))

    @property
    def complete(self) -> bool:
        """True once every copy is in host memory and ``on_complete`` has returned."""
        with self._lock:
            return self._completed

    def wait(self, tensors: Iterable[torch.Tensor] | None = None) -> None:
        """Return when the copies reading ``tensors`` (all, if None) are done and the sources may change.

        Pending copies are done here, by the caller, rather than waited for. On CUDA the caller's
        current stream is ordered after the copies instead of blocking the host.
        """
        if tensors is None:
            wanted = range(len(self.copies))
        else:
            wanted = sorted({i for t in tensors for i in self._by_storage.get(_storage_key(t), ())})
        for index in wanted:
            if self._claim(index):
                self._issue(index)
        with self._lock:
            while self._error is None and any(self._state[i] != _ISSUED for i in wanted):
                self._lock.wait()
            if self._error is not None:
                raise _for_waiter(self._error)
        if self._cuda:
            stream = torch.cuda.current_stream(self._stream.device)
            for index in wanted:
                if self._events[index] is not None:
                    stream.wait_event(self._events[index])

    def wait_complete(self) -> None:
        """Block until the whole snapshot is in host memory and committed (``on_complete`` ran)."""
        with self._lock:
            while not self._completed and self._error is None:
                self._lock.wait()
            if self._error is not None:
                raise _for_waiter(self._error)

    def run(self) -> None:
        """The copier thread's work: every copy still pending, in order, then the completion."""
        try:
            while True:
                with self._lock:
                    while self._next < len(self.copies) and self._state[self._next] != _PENDING:
                        self._next += 1
                    if self._next == len(self.copies):
                        break
                    index = self._next
                    self._state[index] = -1  # claimed by this thread
                self._issue(index)
            with self._lock:
                while self._issued < len(self.copies) and self._error is None:
                    self._lock.wait()
                if self._error is not None:
                    return
            if self._stream is not None:
                self._stream.synchronize()
            self.on_complete()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting training thread
            with self._lock:
                self._error = error
                self._lock.notify_all()
            return
        with self._lock:
            self._completed = True
            self._lock.notify_all()

    def _claim(self, index: int) -> bool:
        with self._lock:
            if self._state[index] != _PENDING:
                return False
            self._state[index] = -1
            return True

    def _issue(self, index: int) -> None:
        source, destination = self.copies[index]
        try:
            if source.is_cuda:
                with torch.cuda.stream(self._stream):
                    destination.copy_(source, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                self._events[index] = event
            else:
                destination.copy_(source)
        except BaseException as error:  # noqa: BLE001
            with self._lock:
                self._error = error
                self._lock.notify_all()
            raise
        with self._lock:
            self._state[index] = _ISSUED
            self._issued += 1
            self._lock.notify_all()


class Copier:
    """One background thread that runs ``LazyCopy`` jobs one after the other."""

    def __init__(self) -> None:
        self._queue: SimpleQueue[LazyCopy | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="leantrain-snapshot-copier", daemon=True)
        self._thread.start()

    def submit(self, job: LazyCopy) -> LazyCopy:
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        # One thread of intra-op parallelism here (the setting is per thread): the copies are memory
        # bound, and the training thread's pool should keep the cores.
        torch.set_num_threads(1)
        yield_cores_to_training()
        while (job := self._queue.get()) is not None:
            job.run()


# Measured on 2 CPU cores at 350m with a snapshot every step: nice 0 costs 10% of the throughput,
# 8 to 19 about 1%; 19 leaves copies unfinished at the optimizer step (132 ms stalls against 45 at 8).
BACKGROUND_NICENESS = 10


def yield_cores_to_training() -> None:
    """Run the calling thread at a low CPU priority (Linux: ``BACKGROUND_NICENESS``, this thread alone).

    Background snapshot work (copies, checksums) then runs on the cycles the training leaves idle
    (Python dispatch, single-threaded ops, waits) instead of preempting one thread of the training's
    OpenMP team, which stalls the whole team at its next barrier. Elsewhere this does nothing.
    """
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        except OSError:  # not permitted here: run at normal priority
            pass


def pin_host_memory(buffer: torch.Tensor) -> None:
    """Page-lock an existing host buffer (shared memory included) so that CUDA copies into it are async."""
    result = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0)
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister of {buffer.nbytes} bytes failed with error {int(result)}")


def unpin_host_memory(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _for_waiter(error: BaseException) -> BaseException:
    """What the waiting thread raises: a user's error as it is (its message says what to do), else a wrapper."""
    if isinstance(error, UserError):
        return error
    wrapped = RuntimeError("a snapshot copy failed")
    wrapped.__cause__ = error
    return wrapped


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
