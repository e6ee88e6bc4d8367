"""``leantrain export RUN_DIR --out DIR``: a trained run as a Hugging Face model directory.

The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json``; ``AutoModelForCausalLM.from_pretrained(DIR)`` (after ``import leantrain``) gives the
trained model and ``AutoTokenizer.from_pretrained(DIR)`` the tokenizer it was trained with. A run of leantrain's
own model becomes a ``LeanForCausalLM``; a run with ``model.hf`` is written in that HF model's own format.
The weights are the run's final weights, or with ``--checkpoint`` those of a checkpoint. The directory is
written next to ``out`` and renamed into place, so a failed export leaves nothing behind.
"""

import argparse
import dataclasses
import json
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from ..checkpoint.disk import FINAL_WEIGHTS_FILE, latest_good_checkpoint, load_checkpoint
from ..checkpoint.manager import REPLICATED
from ..errors import UserError
from ..nn.hf import LeanConfig, LeanForCausalLM
from ..nn.model import resolve_model_config
from . import tokenizer as bpe
from .config import Config, load_config
from .data import build_data

RUN_CONFIG_FILE = "config.yaml"
RUN_TOKENIZER_FILE = "tokenizer.json"
# Where the trainer keeps a copy of a model.hf run's config.json (and generation_config.json), if it does.
RUN_HF_CONFIG_DIR = "hf_config"


def export_run(run_dir: Path, out: Path, checkpoint: str | None = None) -> Path:
    """Write run ``run_dir`` as a HF model directory ``out`` (new or empty) and return ``out``.

    ``checkpoint`` None takes ``<run_dir>/final/model.safetensors``; ``"latest"`` the newest good checkpoint;
    anything else is the path of a ``step_N`` checkpoint directory.
    """
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no {RUN_CONFIG_FILE}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty directory; refusing to overwrite it")
    cfg = load_config(str(run_dir / RUN_CONFIG_FILE))
    state = load_model_state(run_dir, checkpoint)
    tokenizer_file = run_tokenizer_file(run_dir, cfg)
    hf_path = cfg.model.hf

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".tmp-export-{out.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        if hf_path:
            saved_config = run_dir / RUN_HF_CONFIG_DIR
            hf_dir = saved_config if saved_config.is_dir() else Path(hf_path).expanduser()
            write_hf_export(state, hf_dir, tokenizer_file, staging)
        else:
            write_lean_export(state, cfg, tokenizer_file, staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_model_state(run_dir: Path, checkpoint: str | None) -> dict[str, torch.Tensor]:
    """The model's state dict from the run's final weights or from a checkpoint (see ``export_run``)."""
    if checkpoint is None:
        path = run_dir / "final" / FINAL_WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{run_dir} has no final weights ({path}): the run has not finished; "
                            "export a checkpoint with --checkpoint latest")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path} cannot be read: {error}") from None
    if checkpoint == "latest":
        directory = latest_good_checkpoint(run_dir / "checkpoints")
        if directory is None:
            raise UserError(f"--checkpoint latest: {run_dir / 'checkpoints'} holds no intact checkpoint")
    else:
        directory = Path(checkpoint).expanduser()
    _, payloads = load_checkpoint(directory, [REPLICATED])
    state = payloads[REPLICATED].get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {directory} holds no full model state in {REPLICATED}.pt (a sharded run?); "
                        "export its final weights instead")
    return state


def run_tokenizer_file(run_dir: Path, cfg: Config) -> Path:
    """The tokenizer the run trained with: the run's copy, else the one its data configuration yields."""
    path = run_dir / RUN_TOKENIZER_FILE
    if path.is_file():
        return path
    return Path(build_data(cfg.data, seed=cfg.trainer.seed).tokenizer_path)


def write_lean_export(state: dict[str, torch.Tensor], cfg: Config, tokenizer_file: Path, out: Path) -> None:
    """A ``LeanForCausalLM`` directory: the Transformer's weights under ``model.``, its config, the tokenizer."""
    tokenizer = bpe.load_tokenizer(tokenizer_file, "tokenizer")
    eos_id = bpe.find_eos_id(tokenizer, tokenizer_file)
    model_cfg = resolve_model_config(cfg.model, tokenizer.get_vocab_size(), cfg.data.seq_len)
    # Training-time switches would only slow down whoever loads the model.
    model_cfg = dataclasses.replace(model_cfg, compile=False, activation_checkpointing=False)
    config = LeanConfig.from_model_config(model_cfg, bos_token_id=eos_id, eos_token_id=eos_id)
    with torch.device("meta"):
        model = LeanForCausalLM(config)
    _assign_state(model.model, state, "the run's model configuration")
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out)
    write_tokenizer(tokenizer_file, out, model_cfg.max_seq_len)


def write_hf_export(state: dict[str, torch.Tensor], hf_dir: Path, tokenizer_file: Path, out: Path) -> None:
    """The ``model.hf`` model's own format (``save_pretrained``) with the trained weights, and the tokenizer.

    The architecture comes from ``hf_dir``'s config.json (and generation_config.json, if any). The tokenizer is
    ``hf_dir``'s own (all its files: chat template, special tokens) when it tokenizes as the run's did.
    """
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"model.hf={str(hf_dir)!r}: no config.json to export the run's architecture with")
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _assign_state(model, state, f"the model of {hf_dir}")
    model.tie_weights()
    if (hf_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(hf_dir, local_files_only=True)
    model.save_pretrained(out)
    own_tokenizer = hf_dir / RUN_TOKENIZER_FILE
    if own_tokenizer.is_file() and same_tokenization(own_tokenizer, tokenizer_file):
        AutoTokenizer.from_pretrained(hf_dir, local_files_only=True).save_pretrained(out)
    else:
        write_tokenizer(tokenizer_file, out, getattr(config.get_text_config(), "max_position_embeddings", None))


def same_tokenization(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files split text into the same ids (post-processing, padding aside)."""
    sections = ("normalizer", "pre_tokenizer", "model", "added_tokens", "decoder")
    parsed = [json.loads(bpe.load_tokenizer(path, "tokenizer").to_str()) for path in (a, b)]
    return all(parsed[0].get(key) == parsed[1].get(key) for key in sections)


def write_tokenizer(tokenizer_file: Path, out: Path, max_length: int | None) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` of a fast tokenizer whose end-of-text token is bos and eos."""
    tokenizer = bpe.load_tokenizer(tokenizer_file, "tokenizer")
    eos = tokenizer.id_to_token(bpe.find_eos_id(tokenizer, tokenizer_file))
    kwargs = {"model_max_length": max_length} if max_length else {}
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=eos, eos_token=eos, **kwargs)
    fast.save_pretrained(out)


def _assign_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Put ``state`` into a meta-device ``module`` (no copy); UserError if names or shapes differ from ``what``."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:600]
        raise UserError(f"the weights do not fit {what}: {detail}") from None


def export_main(argv: list[str]) -> int:
    """``leantrain export RUN_DIR --out DIR [--checkpoint latest|PATH]``: the CLI front of ``export_run``."""
    parser = argparse.ArgumentParser(
        prog="leantrain export",
        description="Write a trained run as a Hugging Face model directory (config, safetensors weights, tokenizer) "
                    "that AutoModelForCausalLM.from_pretrained loads after `import leantrain`.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (trainer.run_dir)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument("--checkpoint", metavar="latest|PATH", default=None,
                        help="export a checkpoint instead of the final weights: latest, or a step_N directory")
    args = parser.parse_args(argv)
    out = export_run(Path(args.run_dir), Path(args.out), args.checkpoint)
    print(f"wrote {out}")
    return 0
