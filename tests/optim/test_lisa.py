"""LISA: which blocks get gradients and state, how much state it holds, resume, HF models and DDP."""

import copy
import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from leantrain.errors import UserError
from leantrain.optim.groups import count_state_bytes
from leantrain.optim.lisa import LISA, find_layer_list, sample_layers
from support import exit_rank, run_rank_scripts

VOCAB, DIM, N_BLOCKS = 32, 8, 6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, h):
        return h + self.proj(torch.tanh(self.norm(h)))


class TinyLM(nn.Module):
    """The shape of a leantrain decoder: tok_embeddings, layers, norm, output."""

    def __init__(self, n_blocks: int = N_BLOCKS):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(n_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batch(step: int, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(step))


def block_params(model, i):
    return list(model.layers[i].parameters())


def always_params(model):
    return [p for n, p in model.named_parameters() if not n.startswith("layers.")]


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


# --- finding the block list ---------------------------------------------------------------------------------


class GPT2Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(VOCAB, DIM)
        self.transformer.h = nn.ModuleList(Block() for _ in range(3))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def test_finds_the_block_list():
    assert find_layer_list(TinyLM())[0] == "layers"
    assert find_layer_list(GPT2Like())[0] == "transformer.h"
    assert find_layer_list(tiny_llama())[0] == "model.layers"
    nested = nn.Module()
    nested.trunk = nn.Module()
    nested.trunk.stack = nn.ModuleList([Block()])
    assert find_layer_list(nested, "trunk.stack")[1] is nested.trunk.stack
    with pytest.raises(UserError, match="layers_attr"):
        find_layer_list(nested)
    with pytest.raises(UserError, match="'trunk.missing'"):
        find_layer_list(nested, "trunk.missing")
    with pytest.raises(UserError, match="not an nn.ModuleList"):
        find_layer_list(nested, "trunk")


def test_bad_options_raise_user_error():
    with pytest.raises(UserError, match="n_layers"):
        LISA(TinyLM(), n_layers=N_BLOCKS + 1)
    with pytest.raises(UserError, match="interval"):
        LISA(TinyLM(), interval=0)
    with pytest.raises(UserError, match="'lisa'"):
        LISA(TinyLM()).load_state_dict(torch.optim.AdamW(TinyLM().parameters()).state_dict())


# --- gradients and state follow the active blocks -------------------------------------------------------------


def test_after_a_switch_only_active_blocks_have_gradients_and_state():
    model = make_model()
    opt = LISA(model, n_layers=2, interval=3, seed=5, lr=1e-2)
    previous: list[int] = []
    for step in range(15):
        if step % 3 == 0:
            assert opt.active_layers == sample_layers(N_BLOCKS, 2, 5, step // 3)
            fresh = set(opt.active_layers) - set(previous)
            previous = opt.active_layers
        loss_of(model, batch(step)).backward()
        for i in range(N_BLOCKS):
            assert all((p.grad is not None) == (i in opt.active_layers) for p in block_params(model, i))
        assert all(p.grad is not None for p in always_params(model))
        opt.step()
        opt.zero_grad()
        with_state = {p for p, s in opt.state.items() if s}
        if (step + 1) % 3:  # no switch at this step: exactly the active blocks and the rest hold state
            expected = set(always_params(model)).union(*(block_params(model, i) for i in opt.active_layers))
            assert with_state == expected
        else:  # just switched: the blocks switched off were freed
            assert all(p not in with_state for i in range(N_BLOCKS) if i not in opt.active_layers
                       for p in block_params(model, i))
        if step % 3 == 0:  # a block switched on (again) starts fresh
            for i in fresh:
                assert all(opt.state[p]["step"].item() == 1 for p in block_params(model, i))
    assert len({tuple(sample_layers(N_BLOCKS, 2, 5, k)) for k in range(5)}) > 1


def test_state_bytes_stay_bounded_by_the_active_blocks():
    model = make_model()
    opt = LISA(model, n_layers=2, interval=1, seed=1)
    n_tensors = sum(1 for _ in always_params(model)) + 2 * len(block_params(model, 0))
    active_numel = sum(p.numel() for p in always_params(model)) + 2 * sum(p.numel() for p in block_params(model, 0))
    moment_bytes = 2 * 4 * active_numel
    bound = moment_bytes + 4 * n_tensors  # exp_avg, exp_avg_sq (fp32) and a float32 step per tensor
    full_adamw = 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * len(list(model.parameters()))
    seen = []
    for step in range(40):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        seen.append(count_state_bytes(opt))
    assert max(seen) <= bound < full_adamw
    assert len(set(tuple(sample_layers(N_BLOCKS, 2, 1, k)) for k in range(40))) > 5  # many distinct switches


# --- against torch AdamW ---------------------------------------------------------------------------------------


def test_first_interval_is_adamw_on_the_active_blocks():
    model, reference = make_model(), make_model()
    opt = LISA(model, n_layers=2, interval=5, seed=3, lr=1e-2, weight_decay=0.1)
    active = opt.active_layers
    trained = [p for n, p in reference.named_parameters()
               if not n.startswith("layers.") or int(n.split(".")[1]) in active]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, foreach=False)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            loss_of(m, batch(step)).backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        if name.startswith("layers.") and int(name.split(".")[1]) not in active:
            assert torch.equal(p, frozen_before[name])


def test_all_blocks_active_is_adamw():
    model, reference = make_model(), make_model()
    opt = LISA(model, n_layers=N_BLOCKS, interval=2, lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    for step in range(7):
        for m, o in ((model, opt), (reference, ref_opt)):
            loss_of(m, batch(step)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


# --- checkpointing and schedulers ----------------------------------------------------------------------------


def train(model, opt, steps, scheduler=None):
    for step in steps:
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def test_resume_across_a_switch_matches_the_uninterrupted_run():
    straight = make_model()
    opt = LISA(straight, n_layers=2, interval=3, seed=9, lr=1e-2)
    train(straight, opt, range(10))

    first = make_model()
    opt = LISA(first, n_layers=2, interval=3, seed=9, lr=1e-2)
    train(first, opt, range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = make_model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt = LISA(resumed, n_layers=2, interval=3, seed=9, lr=1e-2)
    opt.load_state_dict(saved["optim"])
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    train(resumed, opt, range(4, 10))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_second_lisa_on_the_model_replaces_the_first():
    model = make_model()
    model.layers[0].norm.weight.requires_grad_(False)  # frozen by the user: stays frozen through both
    first = LISA(model, n_layers=2, interval=3, seed=2, lr=1e-2)
    train(model, first, range(4))  # the first LISA has frozen all but two blocks
    fresh = make_model(seed=1)
    fresh.load_state_dict(model.state_dict())
    fresh.layers[0].norm.weight.requires_grad_(False)
    frozen_by_user = model.layers[0].norm.weight.detach().clone()

    second = LISA(model, n_layers=3, interval=2, seed=7, lr=1e-2)
    reference = LISA(fresh, n_layers=3, interval=2, seed=7, lr=1e-2)
    assert second.active_layers == reference.active_layers
    train(model, second, range(4, 11))
    train(fresh, reference, range(4, 11))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert p.requires_grad == q.requires_grad, name
    assert torch.equal(model.layers[0].norm.weight, frozen_by_user)
    with pytest.raises(UserError, match="replaced by a LISA built later"):
        first.step()


def test_lr_scheduler_drives_the_base_optimizer():
    model = make_model()
    opt = LISA(model, n_layers=1, interval=2, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, range(3), scheduler)
    assert all(group["lr"] == pytest.approx(1e-2 * 0.5**3) for group in opt.base.param_groups)


# --- a Hugging Face model ------------------------------------------------------------------------------------


def test_hf_llama_trains_embedding_head_norm_and_the_active_blocks():
    model = tiny_llama()
    opt = LISA(model, n_layers=1, interval=2, seed=4, lr=1e-2)
    blocks = model.model.layers
    for step in range(5):
        tokens = batch(step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        for i, block in enumerate(blocks):
            assert all((p.grad is not None) == (i in opt.active_layers) for p in block.parameters())
        for name, p in model.named_parameters():
            if ".layers." not in name:
                assert p.grad is not None, name
        opt.step()
        opt.zero_grad()
        frozen = [p for i, b in enumerate(blocks) if i not in opt.active_layers for p in b.parameters()]
        assert not any(p.requires_grad or p in opt.state for p in frozen)


# --- data parallel -------------------------------------------------------------------------------------------



def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with pytest.raises(UserError, match="find_unused_parameters"):
            LISA(nn.parallel.DistributedDataParallel(make_model()))
        model = make_model()
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = LISA(ddp, n_layers=2, interval=2, seed=11, lr=1e-2)
        ref_opt = LISA(reference, n_layers=2, interval=2, seed=11, lr=1e-2)
        torch.manual_seed(100 + rank)  # the ranks' global RNGs differ on purpose
        history = []
        for step in range(8):
            full = batch(step, rows=4 * world_size)
            loss_of(ddp, full[4 * rank: 4 * (rank + 1)]).backward()
            for i in range(N_BLOCKS):  # DDP leaves the frozen blocks without gradients
                assert all((p.grad is not None) == (i in opt.active_layers) for p in block_params(model, i))
            opt.step()
            frozen = [p for i in range(N_BLOCKS) if i not in opt.active_layers for p in block_params(model, i)]
            assert not any(p in opt.state for p in frozen)
            opt.zero_grad()
            # Single-process reference on the whole batch: DDP averages the ranks' gradients.
            loss_of(reference, full).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            history.append(list(opt.active_layers))
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (history, [p.detach() for p in model.parameters()]))
        (h0, p0), (h1, p1) = gathered
        assert h0 == h1 and len(set(map(tuple, h0))) > 1
        assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_draw_the_same_blocks_and_match_one_process():
    run_rank_scripts(__file__, 2)


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    exit_rank()


@pytest.mark.parametrize("saved_at", [4, 6])  # inside an interval; at a switch (new blocks without state)
def test_prepare_load_gives_a_fresh_optimizer_the_saved_blocks_and_state_keys(saved_at):
    """What a torch.distributed.checkpoint template needs: the saved step's active blocks and state entries."""
    model = make_model()
    opt = LISA(model, n_layers=2, interval=3, seed=9, lr=1e-2)
    train(model, opt, range(saved_at))
    fresh = make_model(seed=1)
    weights = [p.detach().clone() for p in fresh.parameters()]
    prepared = LISA(fresh, n_layers=2, interval=3, seed=9, lr=1e-2)
    prepared.prepare_load(saved_at)
    assert prepared.active_layers == opt.active_layers and prepared.steps == saved_at
    names = dict(zip(model.parameters(), (n for n, _ in model.named_parameters())))
    fresh_names = dict(zip(fresh.parameters(), (n for n, _ in fresh.named_parameters())))
    assert sorted(names[p] for p in opt.state) == sorted(fresh_names[p] for p in prepared.state)
    assert all(torch.equal(p, w) for p, w in zip(fresh.parameters(), weights))  # learning rate 0
    assert prepared.state_dict()["param_groups"][0]["lisa"]["active_layers"] == opt.active_layers
