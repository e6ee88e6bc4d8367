"""``leantrain export``: a trained run (and a trained HF model) as a directory ``from_pretrained`` loads exactly.

References: a ``Transformer`` built from the run's config and loaded from the run's safetensors directly,
the tokenizers library on the run's own tokenizer.json, and the trained HF model's own forward.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2MoeConfig

from leantrain.checkpoint.disk import load_checkpoint, write_final_weights
from leantrain.errors import UserError
from leantrain.nn.hf import HFCausalLMAdapter, LeanForCausalLM, load_hf_model
from leantrain.nn.loss import LanguageModelLoss
from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.trainer import export
from leantrain.trainer.config import load_config
from leantrain.trainer.export import export_main, export_run, write_hf_export, write_tokenizer
from leantrain.trainer.tokenizer import train_bpe
from leantrain.trainer.train import train

TEXT = "def parse(line):\n    return [int(x) for x in line.split(',')]  # héllo\n<|endoftext|>class A: pass"


@pytest.fixture(scope="module")
def run(corpus_glob, cache_dir, tmp_path_factory) -> Path:
    """A finished 3-step run of the tiny model with checkpoints at steps 2 and 3."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    overrides = [
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.intermediate_size=128",
        "model.norm=peri", "data.source=text", f"data.path={corpus_glob}", "data.vocab_size=512",
        "data.val_fraction=0.2", "data.seq_len=32", f"data.cache_dir={cache_dir}", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.dtype=fp32", "trainer.eval_interval=0", "trainer.max_steps=3",
        "trainer.device=cpu", "optim.warmup_steps=1", "logging.progress=false", "checkpoint.interval=2",
        f"trainer.run_dir={run_dir}",
    ]
    train(load_config("quickstart", overrides))
    return run_dir


def transformer_from_run(run_dir: Path, state: dict[str, torch.Tensor]) -> Transformer:
    cfg = load_config(str(run_dir / "config.yaml"))
    vocab = Tokenizer.from_file(str(run_dir / "tokenizer.json")).get_vocab_size()
    model = Transformer(resolve_model_config(cfg.model, vocab, cfg.data.seq_len))
    model.load_state_dict(state)
    return model.eval()


def test_export_loads_with_auto_classes_and_gives_the_runs_logits(run, tmp_path):
    out = export_run(run, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "leantrain"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LeanForCausalLM and not model.config.compile
    reference = transformer_from_run(run, load_file(run / "final" / "model.safetensors"))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens) @ reference.head_weight.T)


def test_exported_tokenizer_encodes_like_the_training_tokenizer(run, tmp_path):
    out = export_run(run, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out)
    training = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert tokenizer(TEXT)["input_ids"] == training.encode(TEXT).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == training.token_to_id("<|endoftext|>")
    assert tokenizer.decode(training.encode(TEXT).ids) == TEXT


def test_exported_model_generates(run, tmp_path):
    out = export_run(run, tmp_path / "hf")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main(", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)
    assert torch.equal(generated[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_export_a_checkpoint(run, tmp_path):
    out = export_run(run, tmp_path / "hf", checkpoint=str(run / "checkpoints" / "step_2"))
    _, payloads = load_checkpoint(run / "checkpoints" / "step_2", ["replicated"])
    step_2 = payloads["replicated"]["model"]
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == {f"model.{name}" for name in step_2}
    assert all(torch.equal(exported[f"model.{name}"], value) for name, value in step_2.items())
    final = load_file(run / "final" / "model.safetensors")
    assert not torch.equal(final["layers.0.attention.wq.weight"], step_2["layers.0.attention.wq.weight"])
    latest = load_file(export_run(run, tmp_path / "latest", checkpoint="latest") / "model.safetensors")
    assert all(torch.equal(latest[f"model.{name}"], value) for name, value in final.items())


def test_export_main_writes_and_refuses_to_overwrite(run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with pytest.raises(UserError, match="refusing to overwrite"):
        export_main([str(run), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    assert export_main([str(run), "--out", str(tmp_path / "empty")]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_export_errors_name_what_is_wrong(run, tmp_path):
    with pytest.raises(UserError, match="no config.yaml"):
        export_run(tmp_path, tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no final weights.*--checkpoint latest"):
        export_run(unfinished, tmp_path / "out")
    with pytest.raises(UserError, match="no intact checkpoint"):
        export_run(unfinished, tmp_path / "out", checkpoint="latest")
    (unfinished / "final").mkdir()
    state = load_file(run / "final" / "model.safetensors")
    state.pop("norm.weight")
    save_file(state, unfinished / "final" / "model.safetensors")
    (unfinished / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    with pytest.raises(UserError, match="do not fit.*norm.weight"):
        export_run(unfinished, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- runs of HF models (model.hf) ----------------------------------------------------------------------------


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**fields, **overrides})


def tiny_qwen2_moe_config() -> Qwen2MoeConfig:
    return Qwen2MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                          shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def train_steps(adapter: HFCausalLMAdapter, steps: int = 3) -> None:
    loss_module = LanguageModelLoss(adapter)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss_module(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("hf_config", [tiny_llama_config(), tiny_llama_config(tie_word_embeddings=True),
                                       tiny_qwen2_moe_config()], ids=["llama", "llama_tied", "qwen2_moe"])
def test_hf_run_exports_in_its_own_format_and_round_trips_exactly(run, tmp_path, hf_config):
    hf_dir = tmp_path / "from_scratch"
    hf_config.save_pretrained(hf_dir)
    adapter = HFCausalLMAdapter(load_hf_model(str(hf_dir), torch.float32, seed=0))
    train_steps(adapter)
    write_hf_export({k: v.detach().clone() for k, v in adapter.state_dict().items()}, hf_dir,
                    run / "tokenizer.json", tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(adapter.hf_model)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, adapter.hf_model.eval()(tokens).logits)
    if hf_config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer(TEXT)["input_ids"] == Tokenizer.from_file(str(run / "tokenizer.json")).encode(TEXT).ids


def test_hf_run_keeps_the_models_own_tokenizer_files(run, tmp_path):
    hf_dir = tmp_path / "pretrained"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(hf_dir)
    write_tokenizer(run / "tokenizer.json", hf_dir, 64)
    own_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    own_tokenizer.chat_template = "{{ messages }}"
    own_tokenizer.save_pretrained(hf_dir)
    adapter = HFCausalLMAdapter(load_hf_model(str(hf_dir), torch.float32, seed=0))
    write_hf_export(adapter.state_dict(), hf_dir, run / "tokenizer.json", tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == "{{ messages }}"
    other = tmp_path / "other_tokenizer.json"
    train_bpe([TEXT * 4], 300).save(str(other))
    write_hf_export(adapter.state_dict(), hf_dir, other, tmp_path / "other")
    exported = AutoTokenizer.from_pretrained(tmp_path / "other")
    assert exported.chat_template is None
    assert exported(TEXT)["input_ids"] == Tokenizer.from_file(str(other)).encode(TEXT).ids
    with pytest.raises(UserError, match="do not fit"):
        write_hf_export({"lm_head.weight": torch.zeros(512, 32)}, hf_dir, run / "tokenizer.json", tmp_path / "bad")


@pytest.mark.parametrize("config_copy", [False, True], ids=["model_hf_dir", "run_hf_config"])
def test_export_run_of_a_model_hf_run(run, tmp_path, monkeypatch, config_copy):
    # What the trainer leaves for model.hf=DIR: config.yaml, tokenizer.json, final weights under the HF names.
    hf_dir = tmp_path / "hf_model"
    tiny_llama_config(tie_word_embeddings=True).save_pretrained(hf_dir)
    adapter = HFCausalLMAdapter(load_hf_model(str(hf_dir), torch.float32, seed=0))
    train_steps(adapter)
    run_dir = tmp_path / "hf_run"
    run_dir.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (run_dir / name).write_bytes((run / name).read_bytes())
    write_final_weights(adapter.state_dict(), run_dir / "final")
    if config_copy:  # the run's own copy of the config wins over a model.hf directory that has gone
        hf_dir.rename(run_dir / export.RUN_HF_CONFIG_DIR)
    cfg = load_config(str(run_dir / "config.yaml"))
    cfg.model.hf = str(hf_dir)
    monkeypatch.setattr(export, "load_config", lambda path: cfg)
    out = export_run(run_dir, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded) is LlamaForCausalLM and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, adapter.hf_model.eval()(tokens).logits)
