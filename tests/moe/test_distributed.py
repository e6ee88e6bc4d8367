"""Global balancing over 2 gloo processes: training parity with one process, and exact gradient scaling.

One spawn of 2 ranks runs every scenario; the single-process references run in the test process.
"""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from leantrain.moe.balance import BalanceCollector
from leantrain.moe.config import MoEConfig
from leantrain.moe.layer import MoELayer
from leantrain.moe.router import Routing
from support import exit_rank, spawn_ranks

VOCAB, DIM, HIDDEN, EXPERTS, TOP_K, SEQ = 64, 32, 64, 4, 2, 16
STEPS, ACCUMULATION, MICRO_BATCH = 5, 2, 2  # micro-batch per rank; one process takes 2 * MICRO_BATCH


class TinyMoE(nn.Module):
    """Embedding, one MoE layer with a residual, linear head."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.moe = MoELayer(DIM, HIDDEN, cfg)
        self.moe.init_weights(0.5, 0.1)  # a peaked router: micro-batches route unevenly
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, collector: BalanceCollector) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.moe(h, collector))


def moe_cfg(balance: str) -> MoEConfig:
    return MoEConfig(num_experts=EXPERTS, top_k=TOP_K, balance=balance, lbl_coef=1.0, micro_lbl_coef=0.0,
                     z_loss_coef=1e-3, impl="auto")


def train(balance: str, rank: int, world: int) -> list[float]:
    """5 optimizer steps of 2 micro-steps; each rank takes its slice of every micro-batch of 2*MICRO_BATCH
    sequences. Returns the logged loss per step: the mean over micro-steps and ranks of CE + aux."""
    torch.manual_seed(0)
    model = TinyMoE(moe_cfg(balance))
    group = dist.group.WORLD if world > 1 else None
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    collector = BalanceCollector(moe_cfg(balance), group=group)
    data = torch.randint(0, VOCAB, (STEPS, ACCUMULATION, 2 * MICRO_BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(1))
    per_rank = 2 * MICRO_BATCH // world
    logged = []
    for step in range(STEPS):
        step_loss = torch.zeros(())
        for micro in range(ACCUMULATION):
            batch = data[step, micro, rank * per_rank:(rank + 1) * per_rank]
            sync = world == 1 or micro == ACCUMULATION - 1
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                logits = wrapped(batch[:, :-1], collector)
                loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + collector.loss()
                (loss / ACCUMULATION).backward()
            step_loss += loss.detach() / ACCUMULATION
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        collector.reset()
        if group is not None:
            dist.all_reduce(step_loss, group=group)
        logged.append(step_loss.item() / world)
    return logged


def gradient_scaling(rank: int, world: int, accumulation: int, data: list[list[torch.Tensor]],
                     weight: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Router weight gradient of the global LBL, averaged over ranks as DDP does, and the loss values.

    data[micro][rank] holds that rank's router inputs, [sequences, SEQ, DIM] float64; ranks may
    hold different numbers of sequences.
    """
    weight = weight.clone().requires_grad_(True)
    collector = BalanceCollector(MoEConfig(num_experts=EXPERTS, top_k=TOP_K, balance="global", lbl_coef=1.0,
                                           z_loss_coef=0.0), group=dist.group.WORLD if world > 1 else None)
    values = []
    for micro in range(accumulation):
        x = torch.cat(data[micro][rank::world]) if world > 1 else torch.cat(data[micro])
        logits = x.flatten(0, 1) @ weight.T
        probs = logits.softmax(-1)
        top, experts = probs.topk(TOP_K, -1)
        collector.record(0, Routing(logits, probs, experts, top), torch.bincount(experts.flatten(), minlength=EXPERTS),
                         x.shape[0])
        loss = collector.loss()
        (loss / accumulation).backward()
        values.append(loss.item())
    grad = weight.grad
    if world > 1:
        dist.all_reduce(grad)
        grad /= world
    return grad, values


def scaling_data(accumulation: int) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Per micro-step, rank 0 gets 3 sequences and rank 1 gets 1: unequal token counts."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(EXPERTS, DIM, generator=gen, dtype=torch.float64)
    data = [[torch.randn(n, SEQ, DIM, generator=gen, dtype=torch.float64) for n in (3, 1)]
            for _ in range(accumulation)]
    return data, weight


def reference_gradient(accumulation: int) -> tuple[torch.Tensor, list[float]]:
    """The paper's formula in float64 over all tokens: micro-step a uses f_i from the counts of micro-steps
    1..a of every rank and P_i over every rank's tokens of micro-step a; the steps are averaged."""
    data, weight = scaling_data(accumulation)
    weight = weight.clone().requires_grad_(True)
    counts = torch.zeros(EXPERTS, dtype=torch.float64)
    total, values = 0.0, []
    for micro in range(accumulation):
        probs = (torch.cat(data[micro]).flatten(0, 1) @ weight.T).softmax(-1)
        chosen = probs.topk(TOP_K, -1).indices
        counts = counts + F.one_hot(chosen, EXPERTS).sum((0, 1)).double()
        lbl = EXPERTS * (counts / counts.sum() * probs.mean(0)).sum()
        values.append(lbl.item())
        total = total + lbl / accumulation
    total.backward()
    return weight.grad, values


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {balance: train(balance, rank, world) for balance in ("global", "micro")}
    for accumulation in (1, 2):
        data, weight = scaling_data(accumulation)
        results[f"scaling{accumulation}"] = gradient_scaling(rank, world, accumulation, data, weight)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    dist.destroy_process_group()
    exit_rank()



@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, 2, tmp_path_factory.mktemp("moe_dist"))


def test_global_balancing_on_two_ranks_logs_the_single_process_loss(two_ranks, one_thread):
    single = train("global", 0, 1)
    distributed = two_ranks[0]["global"]
    assert distributed == two_ranks[1]["global"]
    for step, (d, s) in enumerate(zip(distributed, single)):
        assert abs(d - s) <= 1e-5 * abs(s), (step, d, s)


def test_micro_balancing_on_two_ranks_differs_from_one_process(two_ranks, one_thread):
    single = train("micro", 0, 1)
    distributed = two_ranks[0]["micro"]
    # Already at the first step: the mean of two half-batch LBLs is not the LBL of the whole batch.
    assert abs(distributed[0] - single[0]) > 1e-3 * abs(single[0]), (distributed, single)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradient_equals_the_global_batch_formula(two_ranks, accumulation):
    expected_grad, expected_values = reference_gradient(accumulation)
    for rank in range(2):
        grad, values = two_ranks[rank][f"scaling{accumulation}"]
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
        assert values == pytest.approx(expected_values, rel=1e-6)
