"""optim.name=apollo: apollo-torch's APOLLO through build_optimizer, with a weights-only state dict."""

import io
import sys

import pytest
import torch

from leantrain.errors import UserError
from leantrain.nn.config import ModelConfig
from leantrain.nn.model import Transformer, resolve_model_config
from leantrain.optim.build import build_optimizer
from leantrain.optim.config import OptimConfig
from leantrain.optim.groups import count_state_bytes

apollo_torch = pytest.importorskip("apollo_torch", reason="apollo-torch (the dev extra) is not installed")


def tiny_transformer() -> Transformer:
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset="tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           intermediate_size=64), vocab_size=50, seq_len=16)
    return Transformer(cfg)


def train_steps(model: Transformer, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(step))
        hidden = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy((hidden @ model.head_weight.T).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def apollo_config(**overrides) -> OptimConfig:
    return OptimConfig(name="apollo", lr=1e-2, rank=8, update_proj_gap=3, **overrides)


def test_projects_the_block_matrices_with_apollo_defaults():
    model = tiny_transformer()
    optimizer = build_optimizer(apollo_config(), model)
    assert isinstance(optimizer, apollo_torch.APOLLOAdamW)
    projected = next(g for g in optimizer.param_groups if "rank" in g)
    assert (projected["proj"], projected["scale_type"], projected["scale"]) == ("random", "channel", 1.0)
    assert len(projected["params"]) == 2 * 7  # wq, wk, wv, wo, w1, w2, w3 of each block
    assert id(model.output.weight) not in {id(p) for p in projected["params"]}


def test_state_dict_loads_weights_only_and_resumes_exactly():
    model, resumed_model = tiny_transformer(), tiny_transformer()
    optimizer = build_optimizer(apollo_config(), model)
    train_steps(model, optimizer, range(4))  # a refresh at step 3 advances each projector's seed
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model.load_state_dict(saved["model"])
    resumed = build_optimizer(apollo_config(), resumed_model)
    resumed.load_state_dict(saved["optimizer"])
    assert count_state_bytes(resumed) == count_state_bytes(optimizer)
    # Past the next refresh (step 6): the rebuilt projectors must draw the same matrices.
    expected = train_steps(model, optimizer, range(4, 8))
    assert train_steps(resumed_model, resumed, range(4, 8)) == expected
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_bytes_count_the_projection_matrices():
    model = tiny_transformer()
    optimizer = build_optimizer(apollo_config(), model)
    train_steps(model, optimizer, range(1))
    projector_bytes = sum(s["projector"].ortho_matrix.numel() * 4 for s in optimizer.state.values() if "projector" in s)
    moments = sum(s[k].numel() * 4 for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s)
    assert projector_bytes > 0
    assert count_state_bytes(optimizer) == projector_bytes + moments + 4 * 2 * 7  # + each matrix's scaled_grad norm


@pytest.mark.parametrize("overrides, key", [
    (dict(apollo={"scale_type": "row"}), "optim.apollo.scale_type"),
    (dict(proj_type="full"), "optim.proj_type"),
    (dict(layerwise=True), "optim.layerwise"),
])
def test_bad_settings_are_user_errors(overrides, key):
    from leantrain.optim.config import ApolloConfig

    if "apollo" in overrides:
        overrides = {**overrides, "apollo": ApolloConfig(**overrides["apollo"])}
    with pytest.raises(UserError, match=key):
        build_optimizer(apollo_config(**overrides), tiny_transformer())


def test_missing_package_names_the_setting_and_the_install(monkeypatch):
    for name in [m for m in sys.modules if m == "apollo_torch" or m.startswith("apollo_torch.")
                 or m == "leantrain.optim.apollo"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "apollo_torch", None)  # import apollo_torch raises ImportError
    with pytest.raises(UserError, match=r"optim.name=apollo.*pip install apollo-torch.*leantrain\[dev\]"):
        build_optimizer(apollo_config(), tiny_transformer())
