"""leantrain and Hugging Face ``transformers``, both ways.

* ``LeanConfig`` / ``LeanForCausalLM``: leantrain's ``Transformer`` as a ``transformers`` model, so an exported
  run loads with ``AutoModelForCausalLM.from_pretrained`` and generates. Its state dict is the Transformer's
  with a ``model.`` prefix. Importing this module registers both with the Auto classes.
* ``load_hf_model`` / ``HFCausalLMAdapter``: any local HF causal LM trained through leantrain's loss seam
  (``forward(tokens) -> final hidden states`` and ``head_weight``), with the HF model's own parameter names.
  The router logits of HF MoE models (Mixtral, Qwen2-MoE, OLMoE, ...) feed leantrain's ``BalanceCollector``,
  so their load-balancing loss is leantrain's (micro, sequence or global) rather than HF's micro-batch one.
"""

import dataclasses
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import UserError
from ..moe.balance import BalanceCollector
from ..moe.config import MoEConfig, check_moe_config
from ..moe.router import Routing
from .config import ModelConfig
from .loss import IGNORE_INDEX
from .model import PRESETS, Transformer, resolve_model_config

MODEL_TYPE = "leantrain"
HF_SETTING = "model.hf"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Config attributes of HF models that transform the head's logits (soft-capping, scaling): the loss seam
# computes hidden @ head.T and would silently train a different model.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                    "output_multiplier": 1.0}

# ModelConfig fields that say where a model comes from or how a run stores it, not what it is: a LeanConfig
# has no use for them (an exported model's dtype is its safetensors').
SOURCE_FIELDS = ("hf", "param_dtype")

_TINY = PRESETS["tiny"]


class LeanConfig(PreTrainedConfig):
    """A resolved ``ModelConfig`` (every field under its own name) plus the usual HF fields.

    HF's standard names (hidden_size, num_hidden_layers, ...) are aliases of leantrain's. The defaults are
    the tiny preset with the stdlib data's vocabulary and sequence length, so ``LeanConfig()`` builds a model.
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "initializer_range": "init_std",
        "tie_word_embeddings": "tie_embeddings",
    }

    preset: str = "tiny"
    dim: int = _TINY["dim"]
    n_layers: int = _TINY["n_layers"]
    n_heads: int = _TINY["n_heads"]
    n_kv_heads: int = _TINY["n_kv_heads"]
    intermediate_size: int = _TINY["intermediate_size"]
    vocab_size: int = 8192
    max_seq_len: int = 256
    norm: str = "pre"
    embed_norm: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    activation_checkpointing: bool = False
    compile: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **hf_fields) -> "LeanConfig":
        """The config of a resolved ``cfg``; ``hf_fields`` sets the HF-only fields (token ids)."""
        model_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SOURCE_FIELDS}
        unknown = sorted(set(model_fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"LeanConfig has no field for ModelConfig.{', ModelConfig.'.join(unknown)}")
        return cls(**model_fields, **hf_fields)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)
                              if f.name not in SOURCE_FIELDS})


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """HF's convention: position t predicts labels[t + 1]; the mean over non-ignored labels, or their sum divided
    by ``num_items_in_batch`` (HF Trainer's gradient-accumulation normalisation)."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


class LeanForCausalLM(PreTrainedModel, GenerationMixin):
    """leantrain's ``Transformer`` (as ``self.model``) with full logits = hidden @ head_weight.T.

    No key/value cache: every generation step runs the whole sequence again, which is what ``generate``
    gets (``use_cache`` is accepted and ignored). A tied model has no separate head parameter, so there is
    nothing for HF to tie. Padded batches are refused: the model attends causally to every token.
    """

    config_class = LeanConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerBlock"]
    _tied_weights_keys = None

    def __init__(self, config: LeanConfig):
        super().__init__(config)
        self.model = Transformer(resolve_model_config(config.to_model_config(), vocab_size=0, seq_len=0))
        self.post_init()
        self.generation_config.use_cache = False

    def _init_weights(self, module: nn.Module) -> None:
        # The Transformer's own scheme (scaled residual projections, RoPE tables) for everything; HF guards
        # the nn.init calls so that weights loaded by from_pretrained are left alone.
        if isinstance(module, Transformer):
            module.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        """The head module: the output Linear, or the token embedding when tied (its weight is the head's)."""
        return self.model.tok_embeddings if self.model.output is None else self.model.output

    def set_output_embeddings(self, value: nn.Module) -> None:
        if self.model.output is None:
            raise ValueError("a tied LeanForCausalLM has no separate output head; set the input embeddings")
        self.model.output = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      **kwargs) -> dict:
        # Without a cache the model needs the whole sequence at every step, never just the new token.
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=None, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position (or the last ``logits_to_keep``); the loss when ``labels`` is given."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LeanForCausalLM does not support padding: attention_mask must be all ones")
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position; leave logits_to_keep at 0")
        hidden = self.model(input_ids)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = F.linear(hidden, self.model.head_weight)
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()


def register_auto_classes() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` resolve model type ``leantrain``; idempotent."""
    AutoConfig.register(MODEL_TYPE, LeanConfig, exist_ok=True)
    AutoModelForCausalLM.register(LeanConfig, LeanForCausalLM, exist_ok=True)


# ---- any HF causal LM through leantrain's loss seam ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RouterShape:
    """The routing of an HF MoE model, read from its config."""

    num_experts: int
    top_k: int
    renormalize: bool
    """Whether the k chosen probabilities are rescaled to sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob)."""


def router_shape(hf_model: PreTrainedModel, setting: str = HF_SETTING) -> RouterShape | None:
    """The routers of an HF MoE model whose class computes the softmax load-balancing loss from its router
    logits (its modeling module defines ``load_balancing_loss_func``: Mixtral, Qwen2/3-MoE, OLMoE, ...);
    None for dense models and for MoE models that balance otherwise (sigmoid routers with bias updates)."""
    config = hf_model.config.get_text_config()
    module = sys.modules.get(type(hf_model).__module__)
    if not hasattr(config, "output_router_logits") or not hasattr(module, "load_balancing_loss_func"):
        return None
    num_experts = next((getattr(config, name) for name in ("num_local_experts", "num_experts")
                        if isinstance(getattr(config, name, None), int)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        raise UserError(f"{setting} ({type(hf_model).__name__}) is an MoE model whose config names no expert count "
                        "(num_local_experts / num_experts) or top-k (num_experts_per_tok)")
    return RouterShape(num_experts, top_k, bool(getattr(config, "norm_topk_prob", True)))


def has_weights(directory: Path) -> bool:
    """Whether a HF model directory holds weights (pretrained) or only a config (a model to train from scratch)."""
    return any((directory / name).is_file() for name in WEIGHT_FILES) or any(directory.glob("*.safetensors"))


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                  setting: str = HF_SETTING) -> PreTrainedModel:
    """The causal LM of local directory ``path``, in training mode.

    A directory with weights loads them (fine-tuning); one with only ``config.json`` builds a new model
    initialised by the model's own scheme under ``torch.manual_seed(seed)`` (pre-training). Nothing is
    downloaded. ``setting`` names the config key for errors.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UserError(f"{setting}={path!r}: no such directory")
    if not (directory / "config.json").is_file():
        raise UserError(f"{setting}={path!r} has no config.json; give a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{setting}={path!r}: cannot read config.json: {str(error).splitlines()[0]}") from None
    torch.manual_seed(seed)
    try:
        if has_weights(directory):
            model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        if "AutoModelForCausalLM" in str(error):
            raise UserError(f"{setting}={path!r}: model type {config.model_type!r} is not a causal language "
                            "model (AutoModelForCausalLM does not know it)") from None
        raise UserError(f"{setting}={path!r}: cannot load the model: {str(error).splitlines()[0]}") from None
    except (OSError, SafetensorError) as error:
        raise UserError(f"{setting}={path!r}: cannot load the weights: {str(error).splitlines()[0]}") from None
    return model.train()


class HFCausalLMAdapter(nn.Module):
    """A HF causal LM seen through leantrain's seam: ``forward(tokens) -> final hidden states``, ``head_weight``.

    The adapter registers the HF model's own children (``model``, ``lm_head``, ...) under their own names, so
    its parameter names, state dict and block paths (``model.layers``) are exactly the HF model's; ``hf_model``
    is the HF model itself (not a submodule), e.g. for ``save_pretrained``. The hidden states are the base
    model's last hidden state, which the head turns into logits unchanged; models that transform the logits
    (head bias, soft-capping, scaling) are refused.

    MoE models (``router``: their ``RouterShape``): given a ``BalanceCollector``, the forward asks the base model
    for every MoE layer's router logits and records them into it as leantrain's own MoE layers do, so the run's
    ``moe.balance`` and coefficients apply. Only the base model runs, never the HF causal LM's forward, so HF's
    own auxiliary loss (``router_aux_loss_coef`` x its micro-batch LBL) is never computed or added.
    """

    def __init__(self, hf_model: PreTrainedModel, setting: str = HF_SETTING, verify_logits: bool = True):
        super().__init__()
        name = f"{setting} ({type(hf_model).__name__})"
        _check_causal_lm(hf_model, name)
        object.__setattr__(self, "hf_model", hf_model)
        self.setting = setting
        for child_name, child in hf_model.named_children():
            self.add_module(child_name, child)
        for param_name, param in hf_model.named_parameters(recurse=False):
            self.register_parameter(param_name, param)
        for buffer_name, buffer in hf_model.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer,
                                 persistent=buffer_name not in hf_model._non_persistent_buffers_set)
        self.decoder_name = hf_model.base_model_prefix
        accepted = inspect.signature(hf_model.base_model.forward).parameters
        self.decoder_kwargs = {"use_cache": False} if "use_cache" in accepted else {}
        if hasattr(hf_model.config, "output_router_logits"):
            self.decoder_kwargs["output_router_logits"] = False
        self.router = router_shape(hf_model, setting)
        if verify_logits and not any(p.is_meta for p in hf_model.parameters()):
            self._verify_logits(name)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection's weight [vocab, dim]: logits = hidden @ head_weight.T, as the HF model computes."""
        return self.hf_model.get_output_embeddings().weight

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    def moe_config(self, settings: MoEConfig) -> MoEConfig:
        """The run's ``moe`` section (balance mode, coefficients) with this model's expert count and top-k;
        num_experts is 0 for a model without softmax routers."""
        if self.router is None:
            return dataclasses.replace(settings, num_experts=0)
        cfg = dataclasses.replace(settings, num_experts=self.router.num_experts, top_k=self.router.top_k,
                                  renormalize=self.router.renormalize)
        check_moe_config(cfg)
        return cfg

    def forward(self, tokens: torch.Tensor, balance: BalanceCollector | None = None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, dim]; records the MoE routing into ``balance`` if given."""
        kwargs = self.decoder_kwargs
        if balance is not None:
            if self.router is None:
                raise ValueError(f"{self.setting}: a balance collector was given for a model without softmax routers")
            kwargs = {**kwargs, "output_router_logits": True}
        out = getattr(self, self.decoder_name)(tokens, **kwargs)
        if isinstance(out, torch.Tensor):  # a LeanForCausalLM's
            return out
        if balance is not None:
            self._record_routing(out.router_logits, balance, tokens.shape[0])
        return out.last_hidden_state

    def _record_routing(self, router_logits: tuple[torch.Tensor, ...], balance: BalanceCollector, batch: int) -> None:
        """Each MoE layer's routing, rebuilt from its logits as the HF router chose (softmax, top-k), into
        ``balance`` under the layer's rank among the MoE layers (0, 1, ...)."""
        num_experts = self.router.num_experts
        for layer, logits in enumerate(router_logits):
            if logits.shape[-1] != num_experts:
                raise UserError(f"{self.setting}: MoE layer {layer} returned router logits for {logits.shape[-1]} "
                                f"experts, but the config says {num_experts}")
            routing = Routing.from_logits(logits.reshape(-1, num_experts), self.router.top_k, self.router.renormalize)
            counts = torch.bincount(routing.experts.flatten(), minlength=num_experts)
            balance.record(layer, routing, counts, batch)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters counted once (tied ones too); optionally without the input token embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.hf_model.get_input_embeddings().weight.numel() if exclude_embedding else total

    def check_tokenizer(self, vocab_size: int) -> None:
        """Refuse a tokenizer with ids beyond the model's embedding or head."""
        rows = min(self.vocab_size, self.hf_model.get_input_embeddings().weight.shape[0])
        if vocab_size > rows:
            raise UserError(f"{self.setting}: the model has {rows} token embeddings, fewer than the tokenizer's "
                            f"vocabulary of {vocab_size}; use the model's own tokenizer (data.tokenizer)")

    @torch.no_grad()
    def _verify_logits(self, name: str, n_tokens: int = 8) -> None:
        """Compare hidden @ head.T with the HF model's own logits on a few tokens; UserError if they differ.

        The catch-all for models that change their logits in ways ``_check_causal_lm`` does not know about.
        """
        modes = {module: module.training for module in self.hf_model.modules()}
        self.hf_model.eval()
        try:
            tokens = torch.arange(min(n_tokens, self.vocab_size), device=self.head_weight.device)[None]
            expected = self.hf_model(input_ids=tokens, **self.decoder_kwargs).logits.float()
            actual = F.linear(self(tokens), self.head_weight).float()
        finally:
            for module, training in modes.items():
                module.train(training)
        tolerance = 1e-3 if self.head_weight.dtype == torch.float32 else 3e-2
        if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max())):
            raise UserError(f"{name}: the model's logits are not its last hidden state times its head's weight "
                            "(it transforms them after the head), so leantrain's loss cannot train it")


def _check_causal_lm(hf_model: nn.Module, name: str) -> None:
    if not isinstance(hf_model, PreTrainedModel) or not hf_model.can_generate():
        raise UserError(f"{name} is not a Hugging Face causal language model")
    if hf_model.base_model is hf_model:
        raise UserError(f"{name} has no base model under {hf_model.base_model_prefix!r} to produce hidden states")
    head = hf_model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight.ndim != 2:
        raise UserError(f"{name} has no output head (get_output_embeddings) with a [vocab, hidden] weight")
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{name} has a bias on its output head, which leantrain's loss (hidden @ head.T) would drop")
    config = hf_model.config.get_text_config()
    for attribute, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, attribute, neutral)
        if value != neutral:
            raise UserError(f"{name} transforms its logits after the head ({attribute}={value}), which leantrain's "
                            "loss (hidden @ head.T) would drop")


register_auto_classes()
