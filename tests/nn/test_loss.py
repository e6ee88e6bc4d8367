import pytest
import torch

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.loss import LanguageModelLoss, LossConfig
from leantrain.nn.model import Transformer, resolve_model_config


def tiny_model(tie: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      tie_embeddings=tie)
    return Transformer(resolve_model_config(cfg, vocab_size=97, seq_len=16))


def float64_reference(model: Transformer, inputs, targets) -> torch.Tensor:
    hidden = model(inputs).double()
    logits = hidden @ model.head_weight.double().t()
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("impl", ["cce", "naive"])
def test_summed_loss_and_gradients_match_float64(tie, impl):
    model = tiny_model(tie)
    inputs = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100
    loss = LanguageModelLoss(model, LossConfig(impl=impl, chunk_mb=1))(inputs, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = float64_reference(model, inputs, targets)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cce_under_bf16_autocast_is_close_to_fp32():
    model = tiny_model(False)
    inputs, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    fp32 = LanguageModelLoss(model)(inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = LanguageModelLoss(model)(inputs, targets)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_bad_filter_eps_names_key():
    with pytest.raises(UserError, match="loss.filter_eps"):
        LanguageModelLoss(tiny_model(False), LossConfig(filter_eps="sometimes"))
