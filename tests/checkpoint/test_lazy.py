"""Lazy copies: background copies land exactly, a wait covers only the tensors asked for."""

import os
import threading

import pytest
import torch

from leantrain.checkpoint.lazy import BACKGROUND_NICENESS, Copier, LazyCopy, yield_cores_to_training


def pairs(*sources: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(source, torch.zeros_like(source)) for source in sources]


def test_background_copies_are_exact_and_complete_once():
    sources = [torch.randn(1000, 100), torch.arange(10, dtype=torch.int64), torch.randn(3).to(torch.bfloat16)]
    copies = pairs(*sources)
    completed = []
    copier = Copier()
    job = copier.submit(LazyCopy(copies, lambda: completed.append(True)))
    job.wait_complete()
    copier.close()
    assert job.complete and completed == [True]
    for source, destination in copies:
        assert torch.equal(source, destination)


def test_wait_for_some_tensors_copies_just_those_in_the_callers_thread():
    weight, bias, other = torch.randn(50, 50), torch.randn(50), torch.randn(7)
    copies = pairs(weight, bias, other)
    job = LazyCopy(copies, lambda: None)  # not submitted: nothing copies in the background
    job.wait([weight[3]])  # a view of the weight counts as the weight (same storage)
    assert torch.equal(copies[0][1], weight)
    assert not copies[1][1].any() and not copies[2][1].any()
    snapshot = weight.clone()
    weight.add_(1.0)  # the optimizer may now change it: the copy keeps the value at the boundary
    assert torch.equal(copies[0][1], snapshot)
    assert not job.complete
    worker = threading.Thread(target=job.run)
    worker.start()
    job.wait_complete()
    worker.join()
    assert torch.equal(copies[1][1], bias) and torch.equal(copies[2][1], other)


def test_a_failed_copy_is_raised_to_the_waiter():
    job = LazyCopy([(torch.randn(4), torch.zeros(5))], lambda: None)
    worker = threading.Thread(target=job.run)
    worker.start()
    worker.join()
    with pytest.raises(RuntimeError, match="snapshot copy failed"):
        job.wait()
    with pytest.raises(RuntimeError, match="snapshot copy failed"):
        job.wait_complete()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are a POSIX feature")
def test_background_threads_yield_the_cores_but_the_caller_keeps_its_priority():
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def background():
        yield_cores_to_training()
        seen["background"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    assert seen["background"] == max(mine, BACKGROUND_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
