"""Configuration of the language model (the ``model`` section)."""

from dataclasses import dataclass


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Size preset: tiny | 60m | 130m | 350m | 1b | 7b (LLaMA shapes of the GaLore paper)."""
    dim: int = 0
    """Hidden size; 0 takes the preset's."""
    n_layers: int = 0
    """Number of transformer blocks; 0 takes the preset's."""
    n_heads: int = 0
    """Attention (query) heads; 0 takes the preset's."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 takes the preset's (as many as n_heads for the LLaMA presets)."""
    intermediate_size: int = 0
    """SwiGLU hidden size; 0 takes the preset's."""
    vocab_size: int = 0
    """Vocabulary size (at least the tokenizer's); 0 takes the tokenizer's."""
    max_seq_len: int = 0
    """Longest sequence (RoPE table), at least data.seq_len; 0 takes data.seq_len."""
    norm: str = "pre"
    """Layer-norm placement: pre (x + F(Norm(x))) | post (Norm(x + F(x))) | peri (x + Norm(F(Norm(x))))."""
    embed_norm: bool = False
    """Normalise the token embeddings (Peri-LN's optional embedding norm)."""
    tie_embeddings: bool = False
    """Share the output head's weight with the token embedding."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    param_dtype: str = "fp32"
    """Storage dtype of the weights: fp32 | bf16 (half the bytes, no autocast copies; norm statistics stay fp32)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    compile: bool = False
    """Compile each block with torch.compile."""
    hf: str = ""
    """A local Hugging Face causal-LM directory to train instead of a preset: config.json only (from scratch) or with weights (fine-tuning)."""
