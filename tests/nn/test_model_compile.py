"""model.compile: each block compiled with torch.compile (inductor) computes what eager does.

Compiling needs a C++ compiler on CPU and takes tens of seconds, hence its own file and the slow mark.
"""

import dataclasses
import shutil

import pytest
import torch

from leantrain.nn.config import ModelConfig
from leantrain.nn.model import Transformer, resolve_model_config

pytestmark = [
    pytest.mark.slow,
    # raised inside torch's own compile stack, not by leantrain
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_blocks_match_eager_with_activation_checkpointing():
    cfg = resolve_model_config(
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=96, norm="peri",
                    compile=True, activation_checkpointing=True),
        vocab_size=61,
        seq_len=12,
    )
    torch.manual_seed(0)
    compiled = Transformer(cfg)
    eager = Transformer(dataclasses.replace(cfg, compile=False, activation_checkpointing=False))
    eager.load_state_dict(compiled.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # compiling keeps the parameter names

    toks = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    for model in (compiled, eager):
        hidden = model(toks)
        torch.nn.functional.cross_entropy((hidden @ model.head_weight.T).flatten(0, 1), toks.flatten()).backward()
    with torch.no_grad():
        torch.testing.assert_close(compiled(toks), eager(toks), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
