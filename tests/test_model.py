"""The transformer: shapes, causality, loss, GQA, tying, parameter groups, counts, init, RoPE."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from distlm.config import ModelConfig
from distlm.model import (
    Transformer,
    apply_rotary,
    flops_per_token,
    mlp_hidden_size,
    parameter_groups,
    rope_tables,
    sinusoidal_table,
)

VOCAB, SEQ = 61, 16


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=SEQ, n_layers=2, d_model=32, n_heads=4, d_ff=48)
    base.update(overrides)
    return ModelConfig(**base)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


def tokens(B: int = 2, T: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


VARIANTS = [
    dict(pos=pos, mlp=mlp, n_kv_heads=kv)
    for pos, mlp, kv in itertools.product(("sinusoidal", "learned", "rope"), ("gelu", "swiglu"), (None, 2, 1))
]


def _id(v: dict) -> str:
    return f"{v['pos']}-{v['mlp']}-kv{v['n_kv_heads']}"


# --------------------------------------------------------------------------- shapes and loss


def test_logits_shape_and_loss_is_scalar_float32():
    model = build()
    x = tokens(B=3, T=10)
    logits = model(x)
    assert logits.shape == (3, 10, VOCAB)
    loss = model(x, tokens(B=3, T=10, seed=2))
    assert loss.shape == () and loss.dtype == torch.float32


def test_loss_equals_cross_entropy_of_logits():
    model = build(pos="rope", mlp="swiglu")
    x, y = tokens(), tokens(seed=2)
    expected = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    torch.testing.assert_close(model(x, y), expected)


def test_targets_of_minus_100_are_ignored():
    model = build()
    x, y = tokens(), tokens(seed=2)
    masked = y.clone()
    masked[:, ::2] = -100
    keep = masked != -100
    logits = model(x)
    expected = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(model(x, masked), expected)
    # the masked mean is a different number from the mean over all positions
    assert not torch.allclose(model(x, masked), model(x, y))


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_causal(variant):
    # A large init makes one token's effect on later positions far larger than float noise
    # (at init_std=0.02 a sinusoidal model's later logits move by only ~1e-4).
    model = build(init_std=0.2, **variant)
    x = tokens()
    base = model(x)
    for t in (0, 5, SEQ - 1):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3, "position t must see its own token"
        if t < SEQ - 1:
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3, "later positions must see it"


def test_too_long_input_raises():
    model = build()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(T=SEQ + 1))
    model(tokens(T=SEQ))  # exactly max_seq_len is fine


@pytest.mark.parametrize("key", ["vocab_size", "max_seq_len"])
def test_missing_sizes_name_the_key(key):
    with pytest.raises(ValueError, match=key):
        Transformer(tiny(**{key: None}))


# --------------------------------------------------------------------------- attention


def test_gqa_with_all_kv_heads_is_multi_head():
    mha = build(seed=3, n_kv_heads=None)
    full = build(seed=3, n_kv_heads=4)
    assert full.blocks[0].attn.k_proj.weight.shape == (32, 32)
    x = tokens()
    torch.testing.assert_close(full(x), mha(x))


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_equals_multi_head_with_repeated_kv_weights(kv):
    """Query head h reads kv head h // (n_heads / kv): copy kv weights that way into an MHA model."""
    gqa = build(seed=4, n_kv_heads=kv, bias=True)
    mha = build(seed=5, n_kv_heads=None, bias=True)
    head_dim, group = 32 // 4, 4 // kv
    assert gqa.blocks[0].attn.k_proj.weight.shape == (kv * head_dim, 32)
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if ".k_proj." in name or ".v_proj." in name:
            per_head = value.reshape(kv, head_dim, *value.shape[1:])
            state[name] = per_head.repeat_interleave(group, dim=0).reshape(4 * head_dim, *value.shape[1:])
    mha.load_state_dict(state)
    x = tokens()
    torch.testing.assert_close(mha(x), gqa(x), rtol=1e-5, atol=1e-5)


def test_gqa_fallback_without_enable_gqa_matches(monkeypatch):
    """torch < 2.5 has no enable_gqa; the repeat_interleave path must give the same result."""
    import distlm.model.transformer as transformer

    model = build(seed=6, n_kv_heads=2)
    x = tokens()
    native = model(x)
    monkeypatch.setattr(transformer, "_SDPA_GQA", False)
    torch.testing.assert_close(model(x), native, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_only():
    model = build(dropout=0.5)
    x = tokens()
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


# --------------------------------------------------------------------------- norms


def test_rmsnorm_normalizes_in_float32():
    from distlm.model.transformer import RMSNorm

    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    x = torch.randn(3, 5, 64) * 7 + 1
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.full((3, 5), 4.0), rtol=1e-4, atol=1e-4)
    # bf16 in, bf16 out, and as close to the float32 result as bf16 rounding allows
    yb = norm.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_bias_follows_config(bias):
    model = build(norm="layernorm", bias=bias)
    assert (model.blocks[0].norm1.bias is not None) == bias
    assert (model.blocks[0].attn.q_proj.bias is not None) == bias
    untied = build(norm="layernorm", bias=bias, tie_embeddings=False)
    assert untied.head.lm_head.bias is None  # an LM head never has a bias


# --------------------------------------------------------------------------- embeddings and groups


def test_tied_embeddings_share_storage():
    model = build(tie_embeddings=True)
    assert model.lm_head_weight is model.tok_emb.weight
    assert not hasattr(model.head, "lm_head")  # no second table to keep in step


def test_untied_embeddings_do_not_share():
    model = build(tie_embeddings=False)
    assert model.lm_head_weight.data_ptr() != model.tok_emb.weight.data_ptr()
    # and they are independent tensors after init, not copies
    assert not torch.equal(model.lm_head_weight, model.tok_emb.weight)


@pytest.mark.parametrize("decay_embeddings", [True, False])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_parameter_groups(tie, pos, decay_embeddings):
    model = build(tie_embeddings=tie, pos=pos, bias=True, norm="layernorm")
    decay, no_decay = parameter_groups(model, 0.1, decay_embeddings=decay_embeddings)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids_decay = [id(p) for p in decay["params"]]
    ids_no = [id(p) for p in no_decay["params"]]
    all_ids = [id(p) for p in model.parameters()]
    assert sorted(ids_decay + ids_no) == sorted(all_ids), "every parameter in exactly one group"
    assert not set(ids_decay) & set(ids_no)
    assert all(p.dim() >= 2 for p in decay["params"])
    embeddings = {id(model.tok_emb.weight)} | ({id(model.positions.pos_emb.weight)} if pos == "learned" else set())
    assert all(p.dim() == 1 for p in no_decay["params"] if id(p) not in embeddings)
    assert embeddings <= set(ids_decay if decay_embeddings else ids_no)
    if not tie:
        assert id(model.lm_head_weight) in ids_decay
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[i].rsplit(".", 2)[-2] for i in ids_decay if i not in embeddings}
    assert decayed <= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= decayed
    # the groups are what a torch optimizer accepts
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


# --------------------------------------------------------------------------- counts and flops


def test_num_params_matches_hand_count_gelu_layernorm_bias_untied():
    V, T, L, d, H, kv, ff = 50, 16, 2, 16, 4, 2, 40
    cfg = ModelConfig(vocab_size=V, max_seq_len=T, n_layers=L, d_model=d, n_heads=H, n_kv_heads=kv,
                      d_ff=ff, norm="layernorm", pos="learned", mlp="gelu", bias=True, tie_embeddings=False)
    model = Transformer(cfg)
    kv_dim = kv * (d // H)
    per_layer = (
        2 * d  # norm1 weight + bias
        + (d * d + d) + 2 * (d * kv_dim + kv_dim) + (d * d + d)  # q, k, v, o
        + 2 * d  # norm2
        + (d * ff + ff) + (ff * d + d)  # up, down
    )
    non_embedding = L * per_layer + 2 * d + V * d  # final norm, untied head (no bias)
    assert model.num_params() == non_embedding
    assert model.num_params(non_embedding=False) == non_embedding + V * d + T * d


def test_num_params_matches_hand_count_swiglu_rmsnorm_tied():
    V, T, L, d, H = 50, 16, 3, 16, 2
    cfg = ModelConfig(vocab_size=V, max_seq_len=T, n_layers=L, d_model=d, n_heads=H, d_ff=None,
                      norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=True)
    model = Transformer(cfg)
    ff = 48  # int(8 * 16 / 3) = 42, rounded up to a multiple of 8
    assert mlp_hidden_size(cfg) == ff
    per_layer = d + 4 * d * d + d + 3 * d * ff
    non_embedding = L * per_layer + d
    assert model.num_params() == non_embedding
    assert model.num_params(non_embedding=False) == non_embedding + V * d  # tied head counted once


def test_default_mlp_widths():
    assert mlp_hidden_size(tiny(d_ff=None, d_model=64, mlp="gelu")) == 256
    assert mlp_hidden_size(tiny(d_ff=None, d_model=768, mlp="swiglu")) == 2048  # 2048 = int(8*768/3)
    assert mlp_hidden_size(tiny(d_ff=None, d_model=1000, mlp="swiglu")) == 2688  # 2666 -> next multiple of 64
    assert mlp_hidden_size(tiny(d_ff=100, mlp="swiglu")) == 100


def test_matmul_params_count_a_tied_head():
    from distlm.model import matmul_params

    tied = build(tie_embeddings=True)
    untied = build(tie_embeddings=False)
    # The head's matmul costs the same whether or not its weight is the embedding table.
    assert matmul_params(tied.cfg, tied.num_params()) == matmul_params(untied.cfg, untied.num_params())


def test_flops_per_token():
    cfg = tiny(n_layers=3, d_model=32)
    assert flops_per_token(cfg, 128, 1000) == 6 * 1000 + 12 * 3 * 128 * 32
    # PaLM 540B's own figure: 6N + 12 L H Q T with H*Q = d_model
    palm = ModelConfig(vocab_size=256000, max_seq_len=2048, n_layers=118, d_model=18432, n_heads=48)
    assert math.isclose(flops_per_token(palm, 2048, 540e9), 6 * 540e9 + 12 * 118 * 2048 * 18432)


# --------------------------------------------------------------------------- init


def test_residual_output_projections_have_scaled_init():
    cfg = tiny(n_layers=8, d_model=256, n_heads=4, d_ff=512, bias=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    block = model.blocks[3]
    std, scaled = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for w in (block.attn.q_proj.weight, block.mlp.up_proj.weight, model.tok_emb.weight):
        assert abs(w.std().item() - std) < 0.05 * std
    for w in (block.attn.o_proj.weight, block.mlp.down_proj.weight):
        assert abs(w.std().item() - scaled) < 0.05 * scaled
    assert torch.all(block.attn.q_proj.bias == 0)
    assert torch.all(block.norm1.weight == 1)


# --------------------------------------------------------------------------- positions


def test_sinusoidal_table_is_the_transformer_formula():
    table = sinusoidal_table(10, 8)
    for p in (0, 3, 9):
        for i in range(4):
            angle = p / 10000 ** (2 * i / 8)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    head_dim, n = 16, 64
    cos, sin = rope_tables(head_dim, n, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    # the same q and k at every position: row p is the vector rotated to position p
    rq = apply_rotary(q.expand(n, head_dim), cos, sin)
    rk = apply_rotary(k.expand(n, head_dim), cos, sin)
    for m, k_pos, shift in [(5, 2, 10), (0, 7, 40), (20, 20, 30)]:
        torch.testing.assert_close(rq[m] @ rk[k_pos], rq[m + shift] @ rk[k_pos + shift], atol=1e-4, rtol=1e-4)
    # a different distance gives a different score, so the property above is not vacuous
    assert not math.isclose((rq[5] @ rk[2]).item(), (rq[5] @ rk[3]).item(), abs_tol=1e-3)
    # rotation keeps norms and position 0 is the identity
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n))
    torch.testing.assert_close(rq[0], q)


@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "rope"])
def test_model_sees_token_order(pos):
    """Without positions, causal attention is blind to the order of the prefix: swapping two
    earlier tokens would leave the last position's logits unchanged."""
    model = build(pos=pos, init_std=0.2)
    x = torch.tensor([[3, 9, 14, 27, 5, 11]])
    swapped = x[:, [1, 0, 2, 3, 4, 5]]
    assert (model(x)[0, -1] - model(swapped)[0, -1]).abs().max() > 1e-3


def test_sinusoidal_embeddings_are_scaled_by_sqrt_d_model():
    model = build(pos="sinusoidal", n_layers=1)
    x = tokens(B=1, T=4)
    seen = {}
    model.positions.emb_dropout.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", out))
    model(x)
    expected = model.tok_emb(x) * math.sqrt(32) + sinusoidal_table(SEQ, 32)[:4]
    torch.testing.assert_close(seen["x"], expected)


# --------------------------------------------------------------------------- every option


OPTIONS = list(itertools.product(
    ("layernorm", "rmsnorm"), ("sinusoidal", "learned", "rope"), ("gelu", "swiglu"),
    (False, True), (False, True), (None, 1),
))


def test_every_option_combination_trains():
    x, y = tokens(T=8), tokens(T=8, seed=2)
    for norm, pos, mlp, bias, tie, kv in OPTIONS:
        model = build(norm=norm, pos=pos, mlp=mlp, bias=bias, tie_embeddings=tie, n_kv_heads=kv,
                      dropout=0.1, n_layers=1).train()
        loss = model(x, y)
        loss.backward()
        where = f"norm={norm} pos={pos} mlp={mlp} bias={bias} tie={tie} kv={kv}"
        assert torch.isfinite(loss), where
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{where}: {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{where}: {name}"
        assert model.tok_emb.weight.grad.abs().sum() > 0, where


@pytest.mark.parametrize("variant", [dict(norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_heads=2),
                                     dict(norm="layernorm", pos="sinusoidal", mlp="gelu", bias=True)],
                         ids=["llama-like", "gpt-like"])
def test_bf16_model_forward_gives_float32_loss(variant):
    model = build(**variant).to(torch.bfloat16)
    x, y = tokens(), tokens(seed=2)
    logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = model(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = build(**variant)(x, y)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
