"""Seeded, chunked initialisation: the configured statistics, independent of dtype, device build and world size.

The 2-rank test shards a meta-device model with FSDP2 (gloo), materialises each rank's shards and
gathers them: they must equal the weights one process draws, bit for bit, and no rank may allocate a
tensor as large as a whole parameter on the way. A small chunk size makes every matrix span several
chunks and every shard boundary fall inside one.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from leantrain.nn import init
from leantrain.nn.config import ModelConfig
from leantrain.nn.loss import LanguageModelLoss
from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.nn.norm import RMSNorm
from support import exit_rank, spawn_ranks

CHUNK = 4096  # elements: the embedding [512, 64] is 8 chunks, each rank's half of it 4


def small_config(**overrides) -> ModelConfig:
    fields = {**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96), **overrides}
    return resolve_model_config(ModelConfig(**fields), vocab_size=512, seq_len=16)


def one_process(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.state_dict()


class LargestAllocation(TorchDispatchMode):
    """The most elements of any plain tensor an op returns (a DTensor's are its local tensor's, seen as well)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                self.numel = max(self.numel, t.numel())
        return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from leantrain.parallel.config import ParallelConfig
    from leantrain.parallel.fsdp import build_fsdp2_engine
    from leantrain.parallel.world import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init.CHUNK_ELEMENTS = CHUNK
    dist.init_process_group("gloo", rank=rank, world_size=world)
    world_info = World(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    results = {}
    for dtype in ("fp32", "bf16"):
        with torch.device("meta"):
            model = Transformer(small_config(param_dtype=dtype))
        largest = LargestAllocation()

        def materialize() -> None:
            with largest:
                model.to_empty(device="cpu")
                model.init_weights(7)

        engine = build_fsdp2_engine(LanguageModelLoss(model), model, ParallelConfig(backend="fsdp2"), world_info,
                                    lambda: torch.optim.SGD(model.parameters(), lr=0.1), 0.0, materialize)
        results[dtype] = {"weights": engine.full_state_dict(), "largest": largest.numel}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
def test_two_fsdp2_ranks_draw_exactly_the_one_process_weights_and_never_a_whole_parameter(tmp_path, monkeypatch):
    ranks = spawn_ranks(_worker, 2, tmp_path)
    monkeypatch.setattr(init, "CHUNK_ELEMENTS", CHUNK)
    for dtype in ("fp32", "bf16"):
        cfg = small_config(param_dtype=dtype)
        expected = one_process(cfg, seed=7)
        whole = max(t.numel() for t in expected.values())
        for rank in ranks:
            got = rank[dtype]["weights"]
            assert set(got) == set(expected)
            for name, value in expected.items():
                assert got[name].dtype == value.dtype and torch.equal(got[name], value), (dtype, name)
            assert rank[dtype]["largest"] <= whole // 2, dtype


def test_statistics_follow_the_configured_init():
    cfg = small_config(init_std=0.05, n_layers=3)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    residual = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    outputs = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith(("wo.weight", "w2.weight"))])
    inputs = torch.cat([p.flatten() for n, p in model.named_parameters()
                        if p.ndim == 2 and not n.endswith(("wo.weight", "w2.weight"))])
    assert outputs.std().item() == pytest.approx(residual, rel=0.05)
    assert inputs.std().item() == pytest.approx(cfg.init_std, rel=0.02)
    assert abs(inputs.mean().item()) < 3 * cfg.init_std / math.sqrt(inputs.numel())
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, RMSNorm))


def test_chunks_are_distinct_draws_and_the_dtype_only_rounds_them(monkeypatch):
    monkeypatch.setattr(init, "CHUNK_ELEMENTS", CHUNK)
    fp32 = one_process(small_config(), seed=3)
    bf16 = one_process(small_config(param_dtype="bf16"), seed=3)
    for name, value in fp32.items():
        assert bf16[name].dtype == torch.bfloat16  # the state dict holds the parameters only
        assert torch.equal(bf16[name], value.to(bf16[name].dtype)), name
    embedding = fp32["tok_embeddings.weight"]  # 64 rows a chunk: the chunks must not repeat each other
    assert not torch.equal(embedding[:64], embedding[64:128])
    assert not torch.equal(fp32["layers.0.attention.wq.weight"], fp32["layers.1.attention.wq.weight"])
    assert not torch.equal(embedding, one_process(small_config(), seed=4)["tok_embeddings.weight"])
    assert torch.equal(embedding, one_process(small_config(), seed=3)["tok_embeddings.weight"])


def test_a_shard_draws_only_its_rows(monkeypatch):
    """Rows [3, 9) of a parameter drawn alone equal those rows of the whole, across chunk boundaries."""
    monkeypatch.setattr(init, "CHUNK_ELEMENTS", 4000)  # 4 rows a chunk
    whole = torch.empty(10, 1000)
    init.normal_(whole, 0.02, seed=5, name="w")
    shard = torch.zeros(10, 1000)
    monkeypatch.setattr(init, "_local_rows", lambda p: (p[3:9], 3))
    init.normal_(shard, 0.02, seed=5, name="w")
    assert torch.equal(shard[3:9], whole[3:9]) and not shard[:3].any() and not shard[9:].any()
