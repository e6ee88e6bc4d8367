"""Global balancing of an HF MoE model (Qwen2-MoE through model.hf) over 2 gloo processes.

Reference: one process on the whole batch, each layer's LBL by HF's own ``load_balancing_loss_func`` (divided
by top_k: HF counts top_k picks per token, we count shares of the routed pairs) on the logits of HF's own forward.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from leantrain.moe.balance import BalanceCollector
from leantrain.moe.config import MoEConfig
from leantrain.nn.hf import HFCausalLMAdapter
from support import exit_rank, spawn_ranks

VOCAB, EXPERTS, TOP_K, BATCH, SEQ = 67, 4, 2, 4, 16


def tiny_qwen2_moe() -> Qwen2MoeForCausalLM:
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=64))
    with torch.no_grad():  # peaked routers: the two halves of the batch route differently
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20)
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def global_lbl(rank: int, world: int) -> tuple[float, list[torch.Tensor]]:
    """This rank's global LBL (coefficient 1, no z-loss) on its half of the batch, and the gradients of all
    parameters averaged over ranks, as DDP does."""
    model = tiny_qwen2_moe()
    adapter = HFCausalLMAdapter(model)
    collector = BalanceCollector(adapter.moe_config(MoEConfig(balance="global", lbl_coef=1.0, z_loss_coef=0.0)),
                                 group=dist.group.WORLD)
    per_rank = BATCH // world
    adapter(batch()[rank * per_rank:(rank + 1) * per_rank], collector)
    loss = collector.loss()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    averaged = []
    for g in grads:
        if g is not None:
            dist.all_reduce(g)
            g = g / world
        averaged.append(g)
    return loss.item(), averaged


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(global_lbl(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, 2, tmp_path_factory.mktemp("hf_moe_dist"))


def test_global_lbl_on_two_ranks_is_hfs_lbl_of_the_whole_batch(two_ranks):
    model = tiny_qwen2_moe()
    hf_lbl = sys.modules[type(model).__module__].load_balancing_loss_func
    logits = model(input_ids=batch(), output_router_logits=True).router_logits
    per_layer = [hf_lbl((layer,), EXPERTS, TOP_K) / TOP_K for layer in logits]
    reference = sum(per_layer)
    expected = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)

    # Micro balancing on each half differs from the whole batch's, so equality below is not a coincidence.
    half = BATCH // 2 * SEQ  # router logits are [tokens, experts], sequence by sequence
    halves = [sum(hf_lbl((layer[h * half:(h + 1) * half],), EXPERTS, TOP_K) / TOP_K for layer in logits)
              for h in (0, 1)]
    assert abs((halves[0] + halves[1]) / 2 - reference) > 1e-3

    for rank, (value, grads) in enumerate(two_ranks):
        assert value == pytest.approx(reference.item(), rel=1e-5), rank
        for (name, _), g, e in zip(model.named_parameters(), grads, expected):
            assert (g is None) == (e is None), name
            if g is not None:
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {name}")
