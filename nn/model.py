"""Decoder-only language model: LLaMA-style blocks with a choice of layer-norm placement.

token embedding -> [optional embedding norm] -> n_layers x block -> final norm -> hidden states.
The model stops at the hidden states; the loss owns the output head (``head_weight``), so a
fused or chunked cross-entropy never has to see the [batch, seq, vocab] logits.

Norm placements, with F the attention or the feed-forward sublayer:
  pre   x + F(Norm(x))                     final norm
  post  Norm(x + F(x))                     no final norm (the last block already ends in one)
  peri  x + Norm_out(F(Norm_in(x)))        final norm (Peri-LN, Kim et al. 2025; Gemma 2's sandwich)
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..moe.balance import BalanceCollector
from ..moe.config import MoEConfig
from ..moe.experts import Experts
from ..moe.layer import MoELayer, is_moe_block
from . import init
from .attention import Attention
from .config import ModelConfig
from .mlp import FeedForward
from .norm import RMSNorm
from .rope import rope_tables

NORM_PLACEMENTS = ("pre", "post", "peri")
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# LLaMA shapes of the GaLore paper (vocab 32000, untied head, max length 1024 and 2048 for 7b), plus
# `tiny` for tests. n_kv_heads 0 means as many as n_heads; tiny's vocab and length come from the data.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=688,
                 vocab_size=0, max_seq_len=0),
    "60m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=0, intermediate_size=1376,
                vocab_size=32000, max_seq_len=1024),
    "130m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=0, intermediate_size=2048,
                 vocab_size=32000, max_seq_len=1024),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=0, intermediate_size=2736,
                 vocab_size=32000, max_seq_len=1024),
    "1b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=0, intermediate_size=5461,
               vocab_size=32000, max_seq_len=1024),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=0, intermediate_size=11008,
               vocab_size=32000, max_seq_len=2048),
}

_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size", "max_seq_len")


def resolve_model_config(cfg: ModelConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """A fully specified, validated copy of cfg.

    Zero fields take the preset's value, except vocab_size and max_seq_len, which take the
    tokenizer's vocabulary and the data's sequence length first (the preset's only when those are 0).
    """
    if cfg.preset not in PRESETS:
        raise UserError(f"model.preset={cfg.preset!r} is not a preset; valid: {', '.join(PRESETS)}")
    for name in _SHAPE_FIELDS:
        if getattr(cfg, name) < 0:
            raise UserError(f"model.{name}={getattr(cfg, name)} must be positive, or 0 to take the default")
    preset = PRESETS[cfg.preset]
    shape = {name: getattr(cfg, name) or preset[name] for name in ("dim", "n_layers", "n_heads", "intermediate_size")}
    shape["n_kv_heads"] = cfg.n_kv_heads or preset["n_kv_heads"] or shape["n_heads"]
    shape["vocab_size"] = cfg.vocab_size or vocab_size or preset["vocab_size"]
    shape["max_seq_len"] = cfg.max_seq_len or seq_len or preset["max_seq_len"]
    resolved = dataclasses.replace(cfg, **shape)

    if resolved.vocab_size <= 0:
        raise UserError(f"model.vocab_size is 0 and preset {cfg.preset!r} has none: set it or provide a tokenizer")
    if resolved.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size={resolved.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})"
        )
    if resolved.max_seq_len <= 0:
        raise UserError(f"model.max_seq_len is 0 and preset {cfg.preset!r} has none: set it or data.seq_len")
    if resolved.max_seq_len < seq_len:
        raise UserError(f"model.max_seq_len={resolved.max_seq_len} is shorter than data.seq_len={seq_len}")
    if resolved.param_dtype not in PARAM_DTYPES:
        raise UserError(f"model.param_dtype={resolved.param_dtype!r} is not a dtype; valid: {', '.join(PARAM_DTYPES)}")
    if resolved.norm not in NORM_PLACEMENTS:
        raise UserError(
            f"model.norm={resolved.norm!r} is not a norm placement; valid: {', '.join(NORM_PLACEMENTS)}"
        )
    if resolved.dim % resolved.n_heads:
        raise UserError(f"model.dim={resolved.dim} is not divisible by model.n_heads={resolved.n_heads}")
    head_dim = resolved.dim // resolved.n_heads
    if head_dim % 2:
        raise UserError(f"head size model.dim / model.n_heads = {head_dim} must be even for RoPE")
    if resolved.n_heads % resolved.n_kv_heads:
        raise UserError(f"model.n_heads={resolved.n_heads} is not divisible by model.n_kv_heads={resolved.n_kv_heads}")
    for name in ("rope_theta", "norm_eps", "init_std"):
        if not getattr(resolved, name) > 0:
            raise UserError(f"model.{name}={getattr(resolved, name)} must be positive")
    return resolved


class TransformerBlock(nn.Module):
    """Attention then SwiGLU feed-forward, each wrapped in a residual and norms per `norm`."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None, layer_id: int = 0):
        super().__init__()
        self.norm_placement = cfg.norm
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads)
        self.is_moe = moe is not None and moe.num_experts > 0 and is_moe_block(moe, layer_id)
        if self.is_moe:
            self.feed_forward = MoELayer(cfg.dim, moe.intermediate_size or cfg.intermediate_size, moe, layer_id)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.intermediate_size)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.norm == "peri":
            self.attention_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                balance: BalanceCollector | None = None) -> torch.Tensor:
        def ffn(h: torch.Tensor) -> torch.Tensor:
            return self.feed_forward(h, balance) if self.is_moe else self.feed_forward(h)

        if self.norm_placement == "pre":
            x = x + self.attention(self.attention_norm(x), rope_cos, rope_sin)
            return x + ffn(self.ffn_norm(x))
        if self.norm_placement == "post":
            x = self.attention_norm(x + self.attention(x, rope_cos, rope_sin))
            return self.ffn_norm(x + ffn(x))
        x = x + self.attention_out_norm(self.attention(self.attention_norm(x), rope_cos, rope_sin))
        return x + self.ffn_out_norm(ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    """tokens [batch, seq] -> final hidden states [batch, seq, dim]. cfg must be resolved.

    With ``moe.num_experts > 0`` every ``moe.every_n_layers``-th block's feed-forward is a mixture
    of experts, which records its balance statistics into the ``balance`` collector passed to forward.
    The parameters are stored in ``cfg.param_dtype`` (the RoPE tables stay fp32). Built under
    ``torch.device("meta")`` it holds no memory until ``to_empty`` and ``init_weights`` (the trainer's
    way: the weights are allocated once, in their storage dtype, on the run's device).
    """

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.embed_norm else None
        self.layers = nn.ModuleList(TransformerBlock(cfg, moe, i) for i in range(cfg.n_layers))
        self.norm = nn.Identity() if cfg.norm == "post" else RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived from the config, so kept out of the state dict; init_weights fills them.
        half = cfg.dim // cfg.n_heads // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)
        dtype = PARAM_DTYPES[cfg.param_dtype]
        for param in self.parameters():
            param.data = param.data.to(dtype)
        self.init_weights()
        self.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.compile:
            for layer in self.layers:
                if not layer.is_moe:  # expert counts give data-dependent shapes: MoE blocks stay eager
                    layer.compile()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fill every parameter (or this rank's shard of it) and the RoPE tables; ``init_stds`` says how.

        The draws depend on ``seed`` and each parameter's name alone (``nn/init.py``), not on the
        world size, the device or the dtype. ``seed`` None is ``torch.initial_seed()``, the seed of
        the last ``torch.manual_seed``. Call it after building on the meta device and ``to_empty``.
        """
        seed = torch.initial_seed() if seed is None else seed
        head_dim = self.cfg.dim // self.cfg.n_heads
        cos, sin = rope_tables(head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        stds = self.init_stds()
        for name, param in self.named_parameters():
            if getattr(param, "_is_hf_initialized", False):  # loaded by HF's from_pretrained: keep it
                continue
            if stds[name] is None:
                init.ones_(param)
            else:
                init.normal_(param, stds[name], seed, name)

    def init_stds(self) -> dict[str, float | None]:
        """Each parameter's initialisation: the std of its normal draw, or None for a norm gain (ones).

        Normal(0, init_std) matrices; the projections back into the residual stream (attention's wo,
        the feed-forwards' w2, the experts' down) scaled by 1/sqrt(2 n_layers) as in GPT-2; unit gains.
        """
        std = self.cfg.init_std
        residual = std / math.sqrt(2 * self.cfg.n_layers)
        stds: dict[str, float | None] = {}
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, RMSNorm):
                stds[prefix + "weight"] = None
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                stds.setdefault(prefix + "weight", std)
            elif isinstance(module, Experts):
                stds[prefix + "gate_up"], stds[prefix + "down"] = std, residual
            elif isinstance(module, Attention):
                stds[prefix + "wo.weight"] = residual
            elif isinstance(module, FeedForward):
                stds[prefix + "w2.weight"] = residual
        missing = [name for name, _ in self.named_parameters() if name not in stds]
        if missing:
            raise TypeError(f"init_stds has no rule for {missing}")
        return stds

    def set_activation_checkpointing(self, enable: bool, checkpoint_fn: Callable | None = None,
                                     every_n_layers: int = 1) -> None:
        """Recompute the activations of every ``every_n_layers``-th block in backward (from the first), through
        ``checkpoint_fn(block, *inputs)``: torch's non-reentrant checkpoint by default, or the function HF's
        ``gradient_checkpointing_enable`` builds (with its kwargs or host offload)."""
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be positive, got {every_n_layers}")
        self.checkpoint_fn = checkpoint_fn or functools.partial(checkpoint, use_reentrant=False)
        self.checkpointed = [enable and i % every_n_layers == 0 for i in range(len(self.layers))]

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection's weight [vocab, dim]: logits = hidden @ head_weight.T."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters counted once (a tied head is the embedding); optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embedding else total

    def forward(self, tokens: torch.Tensor, balance: BalanceCollector | None = None) -> torch.Tensor:
        seq_len = tokens.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise UserError(f"sequence of {seq_len} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        for layer, checkpointed in zip(self.layers, self.checkpointed):
            if checkpointed and torch.is_grad_enabled():
                h = self.checkpoint_fn(layer, h, self.rope_cos, self.rope_sin, balance)
            else:
                h = layer(h, self.rope_cos, self.rope_sin, balance)
        return self.norm(h)
