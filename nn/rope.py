"""Rotary position embedding (RoPE, Su et al. 2021).

Channel i of a head is paired with channel i + head_dim/2 (the "rotate half" layout of HF LLaMA,
so its checkpoints load without permuting wq/wk), and the pair is rotated by the angle
position * theta^(-2i/head_dim). The cos/sin table is computed in float64 and stored in float32.
"""

import torch


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) angle: two [max_seq_len, head_dim // 2] float32 tensors."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by the angles of positions 0..seq-1 of the tables."""
    seq_len = x.shape[1]
    cos = cos[:seq_len, None, :].to(x.dtype)
    sin = sin[:seq_len, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
