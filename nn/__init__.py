"""Models and losses: the LLaMA-style ``Transformer`` with Peri-LN, and cut cross-entropy.

Names are imported on first use (PEP 562), so that ``import leantrain`` stays free of torch and
transformers. The Hugging Face classes (``LeanConfig``, ``LeanForCausalLM``, ``HFCausalLMAdapter``)
are in ``leantrain.nn.hf``.
"""

from importlib import import_module

_EXPORTS = {
    "ModelConfig": ".config",
    "Transformer": ".model",
    "PRESETS": ".model",
    "resolve_model_config": ".model",
    "linear_cross_entropy": ".cut_ce",
    "LinearCrossEntropy": ".cut_ce",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
