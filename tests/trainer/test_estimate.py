"""``leantrain estimate``: the traced estimate against measured peaks, its JSON, and how it follows the options."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from leantrain.errors import UserError
from leantrain.trainer.cli import main
from leantrain.trainer.config import load_config
from leantrain.trainer.estimate import COMPONENTS, SCHEMA_VERSION, estimate, measure

REPO = Path(__file__).resolve().parents[2]
# The quickstart's tokenizer size is data.vocab_size (8192): no corpus is read, the batch is random tokens.
SMALL = {"tiny": ["trainer.micro_batch_size=4", "trainer.global_batch_size=4", "data.seq_len=64"],
         "130m": ["trainer.micro_batch_size=2", "trainer.global_batch_size=2", "data.seq_len=32"]}
OPTIMIZERS = {
    "adamw": ["optim.name=adamw"],
    "galore": ["optim.name=galore"],
    "frugal": ["optim.name=frugal"],
    "galore+layerwise": ["optim.name=galore", "optim.layerwise=true", "trainer.grad_clip=0"],
}
# Exact SVDs of the 130m matrices take minutes on 2 cores; the randomized refresh is GaLore's own option.
FAST_SVD = {"tiny": [], "130m": ["optim.svd=randomized"]}


def config(*overrides: str):
    return load_config("quickstart", list(overrides))


_cache: dict[tuple, object] = {}


def planned(*overrides: str, world_size: int = 1):
    key = (overrides, world_size)
    if key not in _cache:
        _cache[key] = estimate(config(*overrides), world_size)
    return _cache[key]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("preset", ["tiny", "130m"])
def test_estimate_within_10_percent_of_the_measured_peak(preset, optimizer, one_thread):
    cfg = config(f"model.preset={preset}", *SMALL[preset], *OPTIMIZERS[optimizer],
                 *(FAST_SVD[preset] if "galore" in optimizer else []))
    est = estimate(cfg)
    measured = measure(cfg)
    assert measured["device"] == "cpu" and measured["peak"] > 0
    ratio = est.device_peak / measured["peak"]
    print(f"{preset} {optimizer}: estimate {est.device_peak} B, measured {measured['peak']} B, ratio {ratio:.4f}")
    assert abs(ratio - 1) <= 0.10


@pytest.mark.cuda
@pytest.mark.parametrize("low_bit", [[], ["model.param_dtype=bf16", "optim.state_bits=8"]], ids=["fp32", "bf16-8bit"])
def test_estimate_within_10_percent_of_max_memory_allocated_for_350m_galore(low_bit):
    cfg = config("model.preset=350m", "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "data.seq_len=512",
                 "optim.name=galore", "trainer.device=cuda", *low_bit)
    est = estimate(cfg)
    measured = measure(cfg)
    assert measured["device"] == "cuda" and measured["method"] == "torch.cuda.max_memory_allocated"
    ratio = est.device_peak / measured["peak"]
    print(f"350m galore {low_bit} on CUDA: estimate {est.device_peak} B, measured {measured['peak']} B, "
          f"ratio {ratio:.4f}")
    assert abs(ratio - 1) <= 0.10


def test_json_schema_is_stable(capsys):
    assert main(["estimate", "quickstart", *SMALL["tiny"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"schema", "run", "device", "host", "bf16_weights_and_state", "measured", "notes"}
    assert out["schema"] == SCHEMA_VERSION == 1
    assert set(out["run"]) == {"model", "parameters", "vocab_size", "optimizer", "layerwise", "offload", "loss",
                               "activation_checkpointing", "dtype", "backend", "zero_stage", "world_size",
                               "micro_batch_size", "seq_len", "accumulation_steps", "device"}
    assert set(out["device"]) == {"peak", "peak_phase", "at_peak", "largest"}
    assert set(out["host"]) == {"total", "components"}
    components = ("weights", "gradients", "master_weights", "optimizer_state", "activations", "weight_casts",
                  "logits_and_loss", "moe", "temporaries", "parallel_buffers", "checkpoint_buffers")
    assert COMPONENTS == components
    for table in (out["device"]["at_peak"], out["device"]["largest"], out["host"]["components"]):
        assert tuple(table) == components
        assert all(isinstance(v, int) and v >= 0 for v in table.values())
    assert out["device"]["peak"] == sum(out["device"]["at_peak"].values())
    assert out["host"]["total"] == sum(out["host"]["components"].values())
    assert set(out["bf16_weights_and_state"]) == {"weights", "optimizer_state", "total"}
    assert out["measured"] is None and out["notes"] == []
    assert out["run"]["parameters"] == 7_096_576 and out["run"]["vocab_size"] == 8192


def test_readme_documents_the_json_keys():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Memory estimate"):]
    for key in (*COMPONENTS, "schema", "peak_phase", "at_peak", "largest", "bf16_weights_and_state", "measured"):
        assert f"`{key}`" in section, key


def test_parameters_and_state_follow_the_optimizer():
    adamw = planned(*SMALL["tiny"], "optim.name=adamw")
    galore = planned(*SMALL["tiny"], "optim.name=galore", "optim.rank=64")
    weights = adamw.device["weights"]
    assert adamw.largest["optimizer_state"] >= 2 * (weights - 8192 * 4)  # two fp32 moments (+ step counters)
    assert galore.largest["optimizer_state"] < adamw.largest["optimizer_state"]
    # AdamW's bf16 accounting: the weights and two moments, 2 bytes each.
    assert adamw.bf16_weights_and_state["total"] == 6 * adamw.run["parameters"]


def test_per_layer_updates_free_gradients_in_backward():
    full = planned(*SMALL["tiny"], "optim.name=galore", "optim.rank=64", "trainer.grad_clip=0")
    layerwise = planned(*SMALL["tiny"], "optim.name=galore", "optim.rank=64", "trainer.grad_clip=0",
                        "optim.layerwise=true")
    assert layerwise.largest["gradients"] < full.largest["gradients"] / 2


def test_cut_cross_entropy_never_holds_the_logits():
    cce = planned(*SMALL["tiny"], "loss.impl=cce")
    naive = planned(*SMALL["tiny"], "loss.impl=naive")
    logits = 4 * 64 * 8192 * 4  # [tokens, vocab] in fp32
    assert naive.largest["logits_and_loss"] >= 2 * logits
    assert cce.largest["logits_and_loss"] < naive.largest["logits_and_loss"]


def test_activation_checkpointing_and_dtype():
    plain = planned(*SMALL["tiny"])
    checkpointed = planned(*SMALL["tiny"], "model.activation_checkpointing=true")
    fp32 = planned(*SMALL["tiny"], "trainer.dtype=fp32")
    assert checkpointed.largest["activations"] < plain.largest["activations"] / 2
    assert plain.device["weight_casts"] > 0 and fp32.largest["weight_casts"] == 0


def test_bf16_weights_are_half_the_bytes_and_autocast_copies_none():
    fp32 = planned(*SMALL["tiny"])
    bf16 = planned(*SMALL["tiny"], "model.param_dtype=bf16")
    rope = 2 * 64 * 32 * 4  # the fp32 RoPE tables [seq, head_dim / 2] stay fp32
    assert bf16.device["weights"] - rope == (fp32.device["weights"] - rope) // 2
    assert fp32.largest["weight_casts"] > 0 and bf16.largest["weight_casts"] == 0
    assert bf16.largest["gradients"] <= fp32.largest["gradients"] / 2


def test_building_the_model_makes_no_model_sized_temporary():
    """Built on the meta device and drawn chunk by chunk into the storage, the weights are the build's only
    model-sized allocation (the trace once counted them as temporaries until the step began)."""
    est = planned("model.preset=60m", *SMALL["130m"], "optim.name=galore", "optim.layerwise=true",
                  "trainer.grad_clip=0", "model.activation_checkpointing=true")
    assert est.largest["temporaries"] < est.device["weights"] / 2  # the dense embedding's own step: 0.37


@pytest.mark.parametrize("backend", [["parallel.backend=fsdp2"],
                                     ["parallel.backend=deepspeed", "parallel.deepspeed.zero_optimization.stage=3"]])
def test_sharded_weights_are_one_rank_s_share(backend):
    whole = planned(*SMALL["tiny"], *backend)
    sharded = planned("trainer.micro_batch_size=4", "trainer.global_batch_size=16", "data.seq_len=64", *backend,
                      world_size=4)
    assert sharded.run["world_size"] == 4 and sharded.run["accumulation_steps"] == 1
    assert sharded.device["weights"] == math.ceil(whole.device["weights"] / 4)
    assert sharded.device["optimizer_state"] <= math.ceil(whole.largest["optimizer_state"] / 4) + sharded.device[
        "master_weights"]


def test_ddp_buckets_offload_and_checkpoint_slots():
    ddp = planned("trainer.micro_batch_size=4", "trainer.global_batch_size=8", "data.seq_len=64", world_size=2)
    assert ddp.device["parallel_buffers"] == 4 * ddp.run["parameters"]  # an fp32 copy of every gradient
    alone = planned(*SMALL["tiny"])
    offload = planned(*SMALL["tiny"], "optim.offload=cpu")
    assert offload.device["optimizer_state"] == 0
    assert offload.host["optimizer_state"] == alone.device["optimizer_state"]
    assert offload.host["master_weights"] == offload.host["gradients"] > 0
    lazy = planned(*SMALL["tiny"], "checkpoint.mode=lazy", "checkpoint.interval=10")
    assert lazy.host["checkpoint_buffers"] >= 2 * (lazy.device["weights"] + lazy.device["optimizer_state"])


def test_moe_lisa_and_natural_galore_run_on_fake_tensors():
    moe = planned(*SMALL["tiny"], "moe.num_experts=4", "moe.top_k=2")
    assert moe.largest["moe"] > 0 and "equal shares" in " ".join(moe.notes)
    lisa = planned(*SMALL["tiny"], "optim.name=lisa", "optim.lisa.n_layers=1")
    adamw = planned(*SMALL["tiny"])
    assert lisa.largest["optimizer_state"] < adamw.largest["optimizer_state"]
    assert planned(*SMALL["tiny"], "optim.name=natural_galore").device_peak > 0


def test_hugging_face_model_is_estimated_from_its_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)  # with weights: they are not loaded
    est = planned(f"model.hf={tmp_path}", *SMALL["tiny"])
    expected = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    assert est.run["parameters"] == expected and est.run["vocab_size"] == 512
    assert est.device["weights"] >= 4 * expected and est.largest["activations"] > 0


def test_hugging_face_moe_model_within_10_percent_of_the_measured_peak(tmp_path, one_thread):
    """HF's MoE experts run torch's grouped_mm on the CPU in fp32, whose shape function takes bf16 only."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(tmp_path)
    for dtype in ("fp32", "bf16"):
        cfg = load_config("quickstart", [f"model.hf={tmp_path}", *SMALL["tiny"], f"trainer.dtype={dtype}",
                                         "moe.balance=global"])
        est, measured = estimate(cfg), measure(cfg)
        assert est.largest["activations"] > 0
        assert abs(est.device_peak / measured["peak"] - 1) <= 0.10, (dtype, est.device_peak, measured["peak"])


def test_compare_optimizers_table(capsys):
    assert main(["estimate", "quickstart", *SMALL["tiny"], "model.n_layers=2", "--compare-optimizers"]) == 0
    out = capsys.readouterr().out
    for name in ("adamw", "galore", "natural_galore", "frugal", "lisa", "galore+layerwise"):
        assert re.search(rf"^\| {re.escape(name)} \|", out, re.M), name


def test_mistakes_are_one_line_errors(capsys):
    with pytest.raises(UserError, match="optim.rnak"):
        estimate(config("optim.rnak=3"))
    assert main(["estimate", "quickstart", "optim.rnak=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.rnak" in err
    assert main(["estimate", "quickstart", "--measure", "--world-size", "2"]) == 2
    assert "--world-size" in capsys.readouterr().err
    assert main(["estimate", "quickstart", "parallel.backend=deepspeed", "optim.name=galore"]) == 2
    assert "cannot run GaLoreAdamW" in capsys.readouterr().err


@pytest.mark.slow
def test_galore_7b_plans_within_22_gib_on_cuda(capsys):
    """The bundled 7B config (about a minute: the 7B model's steps traced on fake tensors)."""
    assert main(["estimate", "galore_7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run, device = out["run"], out["device"]
    assert run["model"] == "7b" and run["parameters"] > 6.7e9 and run["device"] == "cuda" and run["layerwise"]
    assert device["peak"] <= 22 * 2**30
    assert device["largest"]["weights"] == pytest.approx(2 * run["parameters"], rel=1e-3)  # bf16
    assert device["largest"]["weight_casts"] == 0
    assert device["largest"]["temporaries"] < device["largest"]["weights"] / 10  # no model-sized temporary
