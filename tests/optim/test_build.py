"""build_optimizer: which parameters are projected or decayed, the optimizer chosen, config validation."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.optim.build import build_optimizer
from leantrain.optim.config import OptimConfig
from leantrain.optim.galore import GaLoreAdamW
from leantrain.optim.layerwise import LayerwiseOptimizer
from leantrain.optim.natural_galore import NaturalGaLoreAdamW


class HFStyleLayer(nn.Module):
    """Hugging Face Llama names: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("q_proj", "k_proj", "v_proj",
                                                                                    "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(8, 16), "up_proj": nn.Linear(8, 16),
                                  "down_proj": nn.Linear(16, 8)})
        self.input_layernorm = nn.LayerNorm(8)


class HFStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(30, 8), "layers": nn.ModuleList([HFStyleLayer()])})
        self.lm_head = nn.Linear(8, 30, bias=False)


def tiny_transformer():
    cfg = resolve_model_config(ModelConfig(preset="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           intermediate_size=64), vocab_size=50, seq_len=16)
    return Transformer(cfg)


def names_in(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("name", ["galore", "natural_galore"])
def test_projects_attention_and_mlp_weights_of_our_model(name):
    model = tiny_transformer()
    opt = build_optimizer(OptimConfig(name=name, weight_decay=0.1, rank=4), model)
    assert type(opt) is {"galore": GaLoreAdamW, "natural_galore": NaturalGaLoreAdamW}[name]
    projected, decayed, undecayed = opt.param_groups
    assert names_in(model, projected["params"]) == {
        f"layers.{i}.{m}.{w}.weight" for i in range(2)
        for m, ws in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3"))) for w in ws}
    assert projected["rank"] == 4 and projected["scale"] == 0.25 and projected["proj_type"] == "std"
    assert names_in(model, decayed["params"]) == {"tok_embeddings.weight", "output.weight"}
    assert decayed["weight_decay"] == 0.1 and "rank" not in decayed
    assert all(p.ndim == 1 for p in undecayed["params"]) and undecayed["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.defaults["decay_before_update"] is True


def test_default_targets_match_hugging_face_names():
    model = HFStyle()
    projected = build_optimizer(OptimConfig(name="galore", rank=2), model).param_groups[0]
    assert names_in(model, projected["params"]) == {
        f"model.layers.0.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}


def test_target_modules_are_regexes():
    model = tiny_transformer()
    projected = build_optimizer(OptimConfig(name="galore", target_modules=[r"attention\.w[qk]$"]),
                                model).param_groups[0]
    assert names_in(model, projected["params"]) == {f"layers.{i}.attention.{w}.weight" for i in range(2)
                                                    for w in ("wq", "wk")}


def test_options_reach_the_optimizer():
    model = tiny_transformer()
    cfg = OptimConfig(name="natural_galore", svd="randomized", switch="rotate", stagger=3, history=5, damping=0.01,
                      update_proj_gap=50, proj_type="full", scale=0.5, lr=0.02, betas=[0.8, 0.9], eps=1e-7)
    opt = build_optimizer(cfg, model)
    group = opt.param_groups[0]
    assert (group["svd"], group["switch"], group["history"], group["damping"]) == ("randomized", "rotate", 5, 0.01)
    assert (group["update_proj_gap"], group["proj_type"], group["scale"]) == (50, "full", 0.5)
    assert (group["lr"], group["betas"], group["eps"]) == (0.02, (0.8, 0.9), 1e-7)
    assert opt.stagger == 3


def test_layerwise_returns_the_wrapper_with_staggered_phases():
    model = tiny_transformer()
    opt = build_optimizer(OptimConfig(name="galore", layerwise=True, stagger=True, update_proj_gap=14,
                                      layerwise_clip=1.0), model)
    assert isinstance(opt, LayerwiseOptimizer) and opt.clip_norm == 1.0
    offsets = [g["refresh_offset"] for g in opt.param_groups if "rank" in g]
    assert offsets == list(range(14))  # 14 projected matrices spread over a gap of 14
    assert isinstance(build_optimizer(OptimConfig(layerwise=True), model), LayerwiseOptimizer)


def test_adamw_is_unchanged():
    model = tiny_transformer()
    opt = build_optimizer(OptimConfig(weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("key, value", [
    ("name", "lion"), ("proj_type", "diag"), ("svd", "qr"), ("switch", "swap"), ("rank", 0),
    ("update_proj_gap", -1), ("scale", 0.0), ("stagger", -3), ("layerwise_clip", -1.0),
    ("target_modules", ["("]), ("target_modules", ["nothing_matches_this"])])
def test_bad_values_name_their_key(key, value):
    with pytest.raises(UserError, match=f"optim.{key}"):
        build_optimizer(OptimConfig(**{"name": "galore", key: value}), tiny_transformer())


@pytest.mark.parametrize("key, value", [("history", -1), ("damping", 0.0)])
def test_bad_natural_galore_values_name_their_key(key, value):
    with pytest.raises(UserError, match=f"optim.{key}"):
        build_optimizer(OptimConfig(**{"name": "natural_galore", key: value}), tiny_transformer())


def test_config_is_a_valid_structured_schema():
    schema = OmegaConf.structured(OptimConfig)
    assert list(schema.target_modules) == ["attention", "attn", "feed_forward", "mlp"]
    for value in (True, 4, False):
        merged = OmegaConf.merge(schema, {"stagger": value})
        assert merged.stagger == value and type(merged.stagger) is type(value)


@pytest.mark.parametrize("name, kind", [("adamw", "AdamW"), ("galore", "GaLoreAdamW"),
                                        ("natural_galore", "NaturalGaLoreAdamW"), ("frugal", "FRUGAL"),
                                        ("lisa", "LISA")])
def test_state_bits_reaches_every_optimizer(name, kind):
    opt = build_optimizer(OptimConfig(name=name, state_bits=8, rank=8), tiny_transformer(), seed=3)
    assert type(opt).__name__ == kind
    inner = opt.base if name == "lisa" else opt
    assert type(inner).__module__.startswith("leantrain") and all(g["state_bits"] == 8 for g in inner.param_groups)
    assert all(g["seed"] == 3 for g in inner.param_groups)


def test_adamw_is_torch_fused_for_fp32_weights_and_leantrain_for_bf16_or_8_bit():
    assert type(build_optimizer(OptimConfig(), tiny_transformer())) is torch.optim.AdamW
    bf16 = tiny_transformer().to(torch.bfloat16)
    assert type(build_optimizer(OptimConfig(), bf16)).__module__ == "leantrain.optim.adamw"
    lisa = build_optimizer(OptimConfig(name="lisa"), bf16)
    assert type(lisa.base).__module__ == "leantrain.optim.adamw"


def test_state_bits_errors_name_the_key():
    with pytest.raises(UserError, match="optim.state_bits"):
        build_optimizer(OptimConfig(state_bits=16), tiny_transformer())
    with pytest.raises(UserError, match="optim.state_bits=8 is not available with optim.name=apollo"):
        build_optimizer(OptimConfig(name="apollo", state_bits=8), tiny_transformer())
