"""leantrain's model as a transformers model, HF causal LMs through the loss seam, and the import hook.

References: the wrapped Transformer's hidden states times its head in float64, a greedy loop written out
here, HF's own loss on its own logits, and each HF model's own forward after save/from_pretrained.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.hf import HFCausalLMAdapter, LeanConfig, LeanForCausalLM, load_hf_model, register_auto_classes
from leantrain.nn.loss import LanguageModelLoss
from leantrain.nn.model import resolve_model_config
from leantrain.optim.build import OPTIMIZERS, build_optimizer
from leantrain.optim.config import OptimConfig

VOCAB = 67
SEQ = 16


def lean_config(**overrides) -> LeanConfig:
    fields = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48)
    fields.update(overrides)
    model_cfg = resolve_model_config(ModelConfig(**fields), vocab_size=VOCAB, seq_len=SEQ)
    return LeanConfig.from_model_config(model_cfg, bos_token_id=0, eos_token_id=0)


def lean_model(seed: int = 0, **overrides) -> LeanForCausalLM:
    torch.manual_seed(seed)
    model = LeanForCausalLM(lean_config(**overrides)).eval()
    with torch.no_grad():  # unit gains would hide a norm applied with the wrong weight
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    fields.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields))


def tiny_qwen2_moe(seed: int = 0) -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(config)


def tokens(batch: int = 2, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- LeanConfig / LeanForCausalLM ---------------------------------------------------------------------------


def test_config_carries_every_model_config_field_and_hf_aliases():
    cfg = resolve_model_config(ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, intermediate_size=80,
                                           norm="peri", embed_norm=True, tie_embeddings=True, rope_theta=500.0,
                                           norm_eps=1e-5, init_std=0.01), vocab_size=VOCAB, seq_len=SEQ)
    config = LeanConfig.from_model_config(cfg, eos_token_id=5)
    assert config.to_model_config() == cfg
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings,
            config.vocab_size) == (48, 3, 6, 3, SEQ, 1e-5, True, VOCAB)
    reloaded = LeanConfig.from_dict(config.to_dict())
    assert reloaded.to_model_config() == cfg and reloaded.eos_token_id == 5


def test_default_config_builds_a_model():
    config = LeanConfig(dim=32, n_heads=4, n_kv_heads=2, n_layers=1, intermediate_size=32)
    assert LeanForCausalLM(config).model.cfg.vocab_size == config.vocab_size


def test_invalid_config_is_a_user_error():
    with pytest.raises(UserError, match="model.n_heads"):
        LeanForCausalLM(lean_config(n_kv_heads=3))


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_hidden_times_head_in_float64(tied):
    model = lean_model(tie_embeddings=tied)
    x = tokens()
    with torch.no_grad():
        logits = model(x).logits
        hidden = model.model(x).double()
    reference = hidden @ model.model.head_weight.double().T
    torch.testing.assert_close(logits.double(), reference, rtol=1e-5, atol=1e-6)
    assert logits.shape == (2, SEQ, VOCAB)
    assert ("model.output.weight" in model.state_dict()) is not tied
    assert all(name.startswith("model.") for name in model.state_dict())


def test_loss_follows_hf_shift_convention():
    model = lean_model()
    x = tokens()
    labels = x.clone()
    labels[0, 5:9] = -100
    out = model(x, labels=labels)
    logits = out.logits.double()
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
             for b in range(2) for t in range(SEQ - 1) if labels[b, t + 1] != -100]
    torch.testing.assert_close(out.loss.double(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    summed = model(x, labels=labels, num_items_in_batch=7).loss
    torch.testing.assert_close(summed.double(), torch.stack(terms).sum() / 7, rtol=1e-5, atol=1e-6)


def test_padding_and_tuple_output():
    model = lean_model()
    x = tokens()
    with pytest.raises(ValueError, match="padding"):
        model(x, attention_mask=torch.ones_like(x).index_fill_(1, torch.tensor([0]), 0))
    loss, logits = model(x, labels=x, attention_mask=torch.ones_like(x), return_dict=False)
    assert logits.shape == (2, SEQ, VOCAB) and loss.ndim == 0
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, logits[:, -1:])


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_auto_from_pretrained_round_trip_exactly(tmp_path, tied):
    model = lean_model(seed=3, tie_embeddings=tied, norm="peri", embed_norm=True)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "leantrain"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is LeanForCausalLM and loaded.config.tie_word_embeddings is tied
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded.model.rope_cos, model.model.rope_cos)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    if tied:
        assert loaded.model.output is None and loaded.get_output_embeddings() is loaded.model.tok_embeddings


def greedy_reference(model: LeanForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            hidden = model.model(sequence)[:, -1]
            next_token = (hidden @ model.model.head_weight.T).argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


@pytest.mark.parametrize("use_cache", [False, True])
def test_greedy_generate_equals_a_greedy_loop(use_cache):
    model = lean_model(seed=4)
    prompt = tokens(batch=2, length=4, seed=7)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0,
                               eos_token_id=None)
    assert torch.equal(generated, greedy_reference(model, prompt, 8))


def block_calls_and_grads(model: LeanForCausalLM) -> tuple[list[int], dict[str, torch.Tensor]]:
    """How often each block's forward ran in one training step, and the gradients of that step."""
    calls = [0] * len(model.model.layers)

    def counted(i: int, forward):
        def forward_once_more(*args, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)
        return forward_once_more

    # Wrapping forward, not a forward hook: torch's checkpoint recomputes without running module hooks.
    for i, layer in enumerate(model.model.layers):
        layer.forward = counted(i, layer.forward)
    model.train()
    model.zero_grad(set_to_none=True)
    x = tokens(batch=2, seed=3)
    model(input_ids=x, labels=x).loss.backward()
    for layer in model.model.layers:
        del layer.forward
    return calls, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    model = lean_model(seed=2)
    calls, expected = block_calls_and_grads(model)
    assert calls == [1, 1] and not model.is_activation_checkpointing
    with pytest.warns(FutureWarning):  # HF's deprecated name, still what most client code calls
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    calls, grads = block_calls_and_grads(model)
    assert calls == [2, 2]  # each block runs again in backward
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=1e-7, msg=name)
    model.activation_checkpointing_enable(every_n_layers=2)
    assert block_calls_and_grads(model)[0] == [2, 1]
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing and block_calls_and_grads(model)[0] == [1, 1]


def test_hf_trainer_trains_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("accelerate", reason="HF's Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = lean_model(seed=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [{"input_ids": x, "labels": x} for x in tokens(batch=8, seed=9)]
    args = TrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=True, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert model.is_activation_checkpointing
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_auto_classes_know_leantrain():
    register_auto_classes()  # idempotent: the import already did it
    config = AutoConfig.for_model("leantrain", dim=32, n_heads=4, n_kv_heads=2, n_layers=1, intermediate_size=32)
    assert isinstance(config, LeanConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), LeanForCausalLM)


# ---- the import hook -----------------------------------------------------------------------------------------

CHECK_REGISTERED = (
    "from transformers import AutoConfig, AutoModelForCausalLM\n"
    "config = AutoConfig.for_model('leantrain', dim=32, n_heads=4, n_kv_heads=2, n_layers=1, intermediate_size=32)\n"
    "assert type(AutoModelForCausalLM.from_config(config)).__name__ == 'LeanForCausalLM'\n"
    "from leantrain.nn.hf_registration import TransformersImportHook\n"
    "assert not any(isinstance(f, TransformersImportHook) for f in sys.meta_path)\n"
)


def run_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_leantrain_stays_light_and_registers_when_transformers_comes():
    run_python("import sys, leantrain\nassert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
               + CHECK_REGISTERED)


def test_import_leantrain_after_transformers_registers_at_once():
    run_python("import sys, transformers, leantrain\nassert 'leantrain.nn.hf' in sys.modules\n" + CHECK_REGISTERED)


def test_hook_survives_leantrain_hf_importing_transformers_itself():
    # leantrain.nn.hf imports transformers, which fires the hook while leantrain.nn.hf is half imported.
    run_python(
        "import sys\n"
        "from leantrain.nn.hf_registration import install_transformers_hook\n"
        "install_transformers_hook(); install_transformers_hook()\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('transformers') is not None  # a mere lookup does not use up the hook\n"
        "import leantrain.nn.hf\n" + CHECK_REGISTERED
    )


# ---- HF causal LMs through the loss seam ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2_moe, lambda: tiny_llama(tie_word_embeddings=True)],
                         ids=["llama", "qwen2_moe", "llama_tied"])
def test_seam_loss_is_hf_loss_times_tokens(build):
    hf_model = build()
    adapter = HFCausalLMAdapter(hf_model)
    assert adapter.state_dict().keys() == hf_model.state_dict().keys()
    x = tokens(batch=3)
    ours = LanguageModelLoss(adapter)(x[:, :-1], x[:, 1:])
    theirs = hf_model(input_ids=x, labels=x).loss * x[:, 1:].numel()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.backward()
    assert hf_model.get_input_embeddings().weight.grad is not None


def test_adapter_shares_the_hf_models_parameters():
    hf_model = tiny_llama(tie_word_embeddings=True)
    adapter = HFCausalLMAdapter(hf_model)
    assert adapter.head_weight is hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    assert {id(p) for p in adapter.parameters()} == {id(p) for p in hf_model.parameters()}
    assert adapter.num_params() == sum(p.numel() for p in hf_model.parameters())
    assert adapter.num_params(exclude_embedding=True) == adapter.num_params() - VOCAB * 32
    assert "hf_model" not in dict(adapter.named_children())
    adapter.check_tokenizer(VOCAB)
    with pytest.raises(UserError, match="model.hf"):
        adapter.check_tokenizer(VOCAB + 1)


def test_adapter_refuses_what_the_seam_would_lose():
    biased = tiny_llama()
    biased.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    with pytest.raises(UserError, match="bias"):
        HFCausalLMAdapter(biased)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="final_logit_softcapping"):
        HFCausalLMAdapter(capped)
    with pytest.raises(UserError, match="causal language model"):
        HFCausalLMAdapter(torch.nn.Linear(2, 2))


def test_probe_catches_an_unknown_logit_transform():
    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = ScaledLlama(tiny_llama().config)
    with pytest.raises(UserError, match="transforms them after the head"):
        HFCausalLMAdapter(model)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2_moe], ids=["llama", "qwen2_moe"])
def test_hf_models_train_with_each_optimizer(build, name):
    adapter = HFCausalLMAdapter(build())
    loss_module = LanguageModelLoss(adapter)
    optimizer = build_optimizer(OptimConfig(name=name, lr=1e-2, rank=4, update_proj_gap=2), adapter)
    x = tokens(batch=4, seed=5)
    losses = []
    for _ in range(6):
        loss = loss_module(x[:, :-1], x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ---- load_hf_model -------------------------------------------------------------------------------------------


def test_load_from_config_directory_is_seeded(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    a, b, c = (load_hf_model(str(tmp_path), torch.float32, seed) for seed in (1, 1, 2))
    assert type(a) is LlamaForCausalLM and a.training
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2_moe], ids=["llama", "qwen2_moe"])
def test_load_pretrained_directory_round_trips_exactly(tmp_path, build):
    hf_model = build().eval()
    hf_model.save_pretrained(tmp_path)
    loaded = load_hf_model(str(tmp_path), torch.float32, seed=9)
    assert type(loaded) is type(hf_model) and loaded.training
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, hf_model(x).logits)


def test_load_an_exported_leantrain_model_through_model_hf(tmp_path):
    model = lean_model(seed=2)
    model.save_pretrained(tmp_path)
    adapter = HFCausalLMAdapter(load_hf_model(str(tmp_path), torch.float32, seed=0))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(F.linear(adapter.eval()(x), adapter.head_weight), model(x).logits)
    assert "model.layers.0.attention.wq.weight" in adapter.state_dict()


def test_load_errors_name_model_hf(tmp_path):
    with pytest.raises(UserError, match="model.hf=.*no such directory"):
        load_hf_model(str(tmp_path / "missing"), torch.float32, 0)
    with pytest.raises(UserError, match="model.hf=.*no config.json"):
        load_hf_model(str(tmp_path), torch.float32, 0)
    AutoConfig.for_model("t5", vocab_size=VOCAB, d_model=32, d_ff=32, num_layers=1, num_heads=2,
                         d_kv=16).save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="model.hf=.*'t5' is not a causal language model"):
        load_hf_model(str(tmp_path / "t5"), torch.float32, 0)
    (tmp_path / "broken").mkdir()
    tiny_llama().config.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.hf=.*weights"):
        load_hf_model(str(tmp_path / "broken"), torch.float32, 0)


def test_from_model_config_refuses_fields_it_would_drop_but_not_the_source():
    @dataclasses.dataclass
    class WithSource(ModelConfig):
        hf: str = "/some/model"

    @dataclasses.dataclass
    class WithExperts(ModelConfig):
        experts: int = 4

    assert LeanConfig.from_model_config(WithSource()).to_model_config() == ModelConfig()
    with pytest.raises(ValueError, match="experts"):
        LeanConfig.from_model_config(WithExperts())
