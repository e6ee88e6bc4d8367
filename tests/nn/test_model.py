"""The decoder-only model: shapes, causality, GQA, RoPE, RMSNorm, norm placements, presets, errors.

Numeric checks compare against float64 references written out by hand below (naive attention
with an explicit mask, RoPE as a complex rotation, RMSNorm from its formula) or against HF
transformers' LLaMA with the same weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from leantrain.errors import UserError
from leantrain.nn.attention import Attention
from leantrain.nn.config import ModelConfig
from leantrain.nn.model import PRESETS, Transformer, resolve_model_config
from leantrain.nn.norm import RMSNorm
from leantrain.nn.rope import apply_rope, rope_tables

VOCAB = 61
SEQ = 12


def small_config(**overrides) -> ModelConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
    fields.update(overrides)
    return resolve_model_config(ModelConfig(**fields), vocab_size=VOCAB, seq_len=SEQ)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_config(**overrides))


def randomize_norm_gains(model: torch.nn.Module) -> None:
    """Unit gains would hide a norm applied with the wrong module's weight."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- float64 references --------------------------------------------------------------------


def ref_rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_rope(x, theta):
    """x [batch, seq, heads, head_dim]: channel pair (i, i + head_dim/2) as one complex number."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(x.shape[1], dtype=torch.float64), freqs)
    z = z * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def ref_attention(x, wq, wk, wv, wo, n_heads, n_kv_heads, theta):
    batch, seq, dim = x.shape
    head_dim = dim // n_heads
    q = ref_rope((x @ wq.T).view(batch, seq, n_heads, head_dim), theta)
    k = ref_rope((x @ wk.T).view(batch, seq, n_kv_heads, head_dim), theta)
    v = (x @ wv.T).view(batch, seq, n_kv_heads, head_dim)
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    heads = []
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(head_dim)
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, kv])
    return torch.cat(heads, dim=-1) @ wo.T


def ref_feed_forward(x, w1, w2, w3):
    gate = x @ w1.T
    return (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T


def ref_block(x, p, prefix, cfg):
    norm = lambda name, y: ref_rms_norm(y, p[f"{prefix}{name}.weight"], cfg.norm_eps)  # noqa: E731
    attn_w = [p[f"{prefix}attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo")]
    attn = lambda y: ref_attention(y, *attn_w, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta)  # noqa: E731
    ffn_w = [p[f"{prefix}feed_forward.{n}.weight"] for n in ("w1", "w2", "w3")]
    ffn = lambda y: ref_feed_forward(y, *ffn_w)  # noqa: E731
    if cfg.norm == "pre":
        x = x + attn(norm("attention_norm", x))
        return x + ffn(norm("ffn_norm", x))
    if cfg.norm == "post":
        x = norm("attention_norm", x + attn(x))
        return norm("ffn_norm", x + ffn(x))
    x = x + norm("attention_out_norm", attn(norm("attention_norm", x)))
    return x + norm("ffn_out_norm", ffn(norm("ffn_norm", x)))


def ref_transformer(model: Transformer, toks):
    cfg = model.cfg
    p = {name: t.detach().double() for name, t in model.state_dict().items()}
    h = p["tok_embeddings.weight"][toks]
    if cfg.embed_norm:
        h = ref_rms_norm(h, p["embed_norm.weight"], cfg.norm_eps)
    for i in range(cfg.n_layers):
        h = ref_block(h, p, f"layers.{i}.", cfg)
    return h if cfg.norm == "post" else ref_rms_norm(h, p["norm.weight"], cfg.norm_eps)


# ---- tests ---------------------------------------------------------------------------------


def test_output_shapes():
    model = build()
    hidden = model(tokens(batch=3))
    assert hidden.shape == (3, SEQ, 64)
    assert hidden.dtype == torch.float32
    assert model.head_weight.shape == (VOCAB, 64)
    assert model.output.weight is model.head_weight


@pytest.mark.parametrize("norm", ["pre", "post", "peri"])
def test_causal(norm):
    model = build(norm=norm)
    toks = tokens()
    changed = toks.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(toks), model(changed)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert (after[:, 7:] - before[:, 7:]).abs().amax(-1).min() > 1e-4


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    head_dim, seq, theta = 32, 1024, 10000.0
    x = torch.randn(2, seq, 3, head_dim, dtype=torch.float64)
    cos, sin = rope_tables(head_dim, seq, theta)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref_rope(x, theta), rtol=0, atol=2e-6)
    # fp32 input: within fp32 rounding of the reference
    torch.testing.assert_close(apply_rope(x.float(), cos, sin).double(), ref_rope(x, theta), rtol=0, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(m, n):
        qs = torch.zeros(1, 64, 1, 16, dtype=torch.float64)
        ks = torch.zeros_like(qs)
        qs[0, m, 0], ks[0, n, 0] = q, k
        return (apply_rope(qs, cos, sin)[0, m, 0] @ apply_rope(ks, cos, sin)[0, n, 0]).item()

    assert score(10, 3) == pytest.approx(score(57, 50), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_rms_norm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 7, 48) * 3
    expected = ref_rms_norm(x.double(), norm.weight.double(), 1e-5)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-6, atol=1e-6)
    # bf16 input: statistics in fp32, so only the final rounding to bf16 differs
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected_bf16 = ref_rms_norm(x.bfloat16().double(), norm.weight.double(), 1e-5)
    torch.testing.assert_close(out.double(), expected_bf16, rtol=2**-8, atol=1e-6)


def test_rms_norm_keeps_float64_and_passes_gradcheck():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_rms_norm(x, norm.weight, 1e-5), rtol=1e-14, atol=1e-14)
    weight = norm.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), (x, weight))


def test_float64_model_passes_gradcheck():
    model = build(dim=16, intermediate_size=32).double()
    names = ("layers.0.attention_norm.weight", "layers.1.ffn_norm.weight", "norm.weight")  # few entries: fast
    params = {name: model.get_parameter(name).detach().clone().requires_grad_(True) for name in names}
    toks = tokens(seq=6)
    hidden = lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (toks,))  # noqa: E731
    assert hidden(*params.values()).dtype == torch.float64
    assert torch.autograd.gradcheck(hidden, tuple(params.values()))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    dim, n_heads, n_kv, head_dim = 64, 8, 2, 8
    gqa = Attention(dim, n_heads, n_kv)
    mha = Attention(dim, n_heads, n_heads)
    group = n_heads // n_kv
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # query head h reads kv head h // group: repeat each kv head's rows group times
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(n_kv, head_dim, dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(n_heads * head_dim, dim))
    cos, sin = rope_tables(head_dim, 16, 10000.0)
    x = torch.randn(2, 16, dim)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_attention_matches_float64_reference():
    torch.manual_seed(0)
    attn = Attention(64, 8, 2)
    cos, sin = rope_tables(8, 16, 500.0)
    x = torch.randn(2, 16, 64)
    w = [getattr(attn, n).weight.detach().double() for n in ("wq", "wk", "wv", "wo")]
    expected = ref_attention(x.double(), *w, 8, 2, 500.0)
    torch.testing.assert_close(attn(x, cos, sin).double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["pre", "post", "peri"])
@pytest.mark.parametrize("embed_norm", [False, True])
def test_norm_placement_matches_float64_reference(norm, embed_norm):
    model = build(norm=norm, embed_norm=embed_norm, rope_theta=1000.0, norm_eps=1e-5)
    randomize_norm_gains(model)
    toks = tokens()
    with torch.no_grad():
        hidden = model(toks)
    torch.testing.assert_close(hidden.double(), ref_transformer(model, toks), rtol=1e-4, atol=1e-5)


def test_norm_modules_per_placement():
    names = lambda m: {n for n, _ in m.named_parameters() if "norm" in n}  # noqa: E731
    pre, post, peri = (build(norm=n) for n in ("pre", "post", "peri"))
    assert names(pre) == {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")} | {
        "norm.weight"
    }
    assert "norm.weight" not in names(post)
    assert isinstance(post.norm, torch.nn.Identity)
    assert names(peri) == names(pre) | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_out_norm", "ffn_out_norm")
    }
    # Peri-LN's output-norm gains are learnable
    peri(tokens()).pow(2).mean().backward()
    grad = peri.layers[0].attention_out_norm.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_matches_hf_llama_with_the_same_weights():
    transformers = pytest.importorskip("transformers")
    model = build(rope_theta=10000.0)
    randomize_norm_gains(model)
    cfg = model.cfg
    hf = transformers.LlamaModel(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        )
    )
    renames = {
        "tok_embeddings": "embed_tokens",
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("output."):
            continue
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        state[name] = tensor
    hf.load_state_dict(state, strict=True)
    toks = tokens()
    with torch.no_grad():
        expected = hf(input_ids=toks, use_cache=False).last_hidden_state
        torch.testing.assert_close(model(toks), expected, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    tied, untied = build(tie_embeddings=True), build()
    assert tied.output is None
    assert tied.head_weight is tied.tok_embeddings.weight
    assert tied.head_weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert not any(k.startswith("output") for k in tied.state_dict())
    assert untied.num_params() - tied.num_params() == VOCAB * 64
    # the tied matrix receives gradient from both the lookup and the head
    toks = tokens()
    hidden = tied(toks)
    F.cross_entropy((hidden @ tied.head_weight.T).flatten(0, 1), toks.flatten()).backward()
    grad = tied.tok_embeddings.weight.grad
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[toks.flatten()] = False
    assert grad[unused].abs().sum() > 0  # rows never looked up still get the head's gradient


def _loss_and_grads(model: Transformer, toks: torch.Tensor):
    hidden = model(toks[:, :-1])
    loss = F.cross_entropy((hidden @ model.head_weight.T).flatten(0, 1), toks[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["pre", "peri"])
def test_activation_checkpointing_same_loss_and_grads(norm):
    plain = build(norm=norm)
    ckpt = Transformer(small_config(norm=norm, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    toks = tokens(seq=SEQ + 1)
    loss_plain, grads_plain = _loss_and_grads(plain, toks)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, toks)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)

    # and the blocks' activations really are dropped: far fewer tensors saved for backward
    def saved_count(model):
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(toks[:, :-1])
        return count

    assert saved_count(ckpt) < saved_count(plain) / 2


def test_bf16_autocast_forward_backward_on_cpu():
    model = build(norm="peri", embed_norm=True)
    toks = tokens(seq=SEQ + 1)
    loss_fp32, _ = _loss_and_grads(model, toks)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(toks[:, :-1])
        logits = hidden @ model.head_weight.T
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.flatten(0, 1).float(), toks[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - loss_fp32.item()) < 2e-2 * loss_fp32.item()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_deterministic_given_seed():
    a, b = build(seed=3), build(seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    toks = tokens()
    with torch.no_grad():
        assert torch.equal(a(toks), b(toks))
    assert not torch.equal(build(seed=4).tok_embeddings.weight, a.tok_embeddings.weight)


def test_init_weights_after_meta_build():
    cfg = small_config()
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.init_weights()
    torch.manual_seed(0)
    reference = Transformer(cfg)
    torch.manual_seed(5)
    reference.init_weights()
    for name, buf in reference.named_buffers():
        assert torch.equal(dict(meta.named_buffers())[name], buf), name
    for (name, x), y in zip(meta.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(x, y), name
    # the statistics init_weights promises
    assert reference.tok_embeddings.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    wo_std = torch.cat([layer.attention.wo.weight.flatten() for layer in reference.layers]).std().item()
    assert wo_std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.1)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in reference.modules() if isinstance(m, RMSNorm))


# GaLore's LLaMA table (see /work/shared/REFERENCE.md): hidden, intermediate, heads, layers.
GALORE_SHAPES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}


@pytest.mark.parametrize("preset", list(GALORE_SHAPES))
def test_presets_match_galore_llama_shapes(preset):
    dim, inter, heads, layers = GALORE_SHAPES[preset]
    cfg = resolve_model_config(ModelConfig(preset=preset), vocab_size=0, seq_len=0)
    assert (cfg.dim, cfg.intermediate_size, cfg.n_heads, cfg.n_layers) == (dim, inter, heads, layers)
    assert (cfg.n_kv_heads, cfg.vocab_size, cfg.norm_eps, cfg.tie_embeddings) == (heads, 32000, 1e-6, False)
    assert cfg.max_seq_len == (2048 if preset == "7b" else 1024)
    if preset in ("1b", "7b"):
        return
    with torch.device("meta"):
        model = Transformer(cfg)
    per_layer = 4 * dim * dim + 3 * dim * inter + 2 * dim
    assert model.num_params() == 2 * 32000 * dim + layers * per_layer + dim
    assert model.num_params(exclude_embedding=True) == 32000 * dim + layers * per_layer + dim
    assert model.layers[0].feed_forward.w1.weight.shape == (inter, dim)
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=32000, hidden_size=dim, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, tie_word_embeddings=False,
            )
        )
    assert model.num_params() == hf.num_parameters()


def test_60m_parameter_count():
    with torch.device("meta"):
        model = Transformer(resolve_model_config(ModelConfig(preset="60m"), vocab_size=32000, seq_len=256))
    assert model.num_params() == 58_073_600


def test_tiny_preset_and_overrides():
    cfg = resolve_model_config(ModelConfig(), vocab_size=1000, seq_len=128)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size) == (256, 4, 4, 2, 688)
    assert (cfg.vocab_size, cfg.max_seq_len) == (1000, 128)
    cfg = resolve_model_config(ModelConfig(preset="60m", n_layers=2, vocab_size=1024), vocab_size=1000, seq_len=128)
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len) == (512, 2, 1024, 128)


@pytest.mark.parametrize(
    "overrides, vocab, seq, needle",
    [
        (dict(preset="huge"), 100, 16, "model.preset='huge' is not a preset; valid: tiny, 60m"),
        (dict(norm="middle"), 100, 16, "model.norm='middle'"),
        (dict(dim=100, n_heads=3), 100, 16, "model.dim=100 is not divisible by model.n_heads=3"),
        (dict(n_heads=4, n_kv_heads=3), 100, 16, "model.n_kv_heads=3"),
        (dict(n_heads=4, n_kv_heads=8), 100, 16, "model.n_kv_heads=8"),
        (dict(dim=12, n_heads=4), 100, 16, "must be even for RoPE"),
        (dict(n_layers=-1), 100, 16, "model.n_layers=-1"),
        (dict(vocab_size=50), 100, 16, "model.vocab_size=50 is smaller than the tokenizer's vocabulary (100)"),
        (dict(max_seq_len=8), 100, 16, "model.max_seq_len=8 is shorter than data.seq_len=16"),
        (dict(), 0, 16, "model.vocab_size is 0"),
        (dict(init_std=0.0), 100, 16, "model.init_std"),
        (dict(norm_eps=-1e-6), 100, 16, "model.norm_eps"),
    ],
)
def test_bad_config_raises_user_error(overrides, vocab, seq, needle):
    with pytest.raises(UserError) as err:
        resolve_model_config(ModelConfig(**overrides), vocab_size=vocab, seq_len=seq)
    assert needle in str(err.value)


def test_sequence_longer_than_max_seq_len_raises_user_error():
    model = build()
    with pytest.raises(UserError, match="model.max_seq_len=12"):
        model(tokens(seq=SEQ + 1))
