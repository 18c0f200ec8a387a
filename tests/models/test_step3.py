import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from flagtree_py.models import tiny_config
from flagtree_py.models.step3 import (
    Step3Attention,
    Step3ForCausalLM,
    Step3MoE,
    Step3RMSNorm,
    Step3RotaryEmbedding,
    Step3TextConfig,
)


@pytest.fixture
def config() -> Step3TextConfig:
    return tiny_config("step3")


def _randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Weights of order 1 (not the 0.02 init) so that every term of the references matters.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(p.shape[-1]))
    return module


def test_shapes(config):
    model = Step3ForCausalLM(config)
    layer0, layer1 = model.model.layers
    assert not layer0.use_moe and hasattr(layer0, "mlp")
    assert layer1.use_moe and hasattr(layer1, "moe") and hasattr(layer1, "share_expert")
    attn = layer0.self_attn
    assert attn.qkv_proj.weight.shape == (64 + 2 * 32, 128)  # low-rank q + one k head + one v head
    assert attn.inter_norm.weight.shape == (64,)
    assert attn.wq.weight.shape == (4 * 32, 64)
    assert attn.o_proj.weight.shape == (128, 4 * 32)
    assert layer0.mlp.gate_proj.weight.shape == (256, 128)
    assert layer1.moe.gate.weight.shape == (8, 128)
    assert layer1.moe.gate_proj.weight.shape == (8, 64, 128)
    assert layer1.moe.down_proj.weight.shape == (8, 128, 64)
    assert layer1.share_expert.up_proj.weight.shape == (64, 128)
    assert model.lm_head.weight.shape == (512, 128)
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (3, 11)))
    assert logits.shape == (3, 11, 512) and torch.isfinite(logits).all()


def test_state_dict_uses_checkpoint_names(config):
    keys = set(Step3ForCausalLM(config).state_dict())
    for key in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.self_attn.inter_norm.weight",
        "model.layers.0.self_attn.wq.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.moe.gate.weight",
        "model.layers.1.moe.up_proj.weight",
        "model.layers.1.share_expert.gate_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        assert key in keys


def test_config_validation_and_truncation():
    with pytest.raises(ValueError):
        Step3TextConfig(num_attention_groups=2)
    with pytest.raises(ValueError):
        Step3TextConfig(moe_num_experts=4, moe_top_k=5)
    published = Step3TextConfig()
    assert min(published.moe_layer_ids()) == 4 and max(published.moe_layer_ids()) == 59
    short = published.truncated(3)
    assert short.num_hidden_layers == 3 and short.moe_layer_ids() == {1, 2}
    assert short.hidden_size == published.hidden_size


def test_rms_norm_matches_float32_reference():
    norm = Step3RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    norm = norm.to(torch.bfloat16)
    x = _randn(3, 16, dtype=torch.float32).to(torch.bfloat16)
    # HF order: normalise in float32, round to the input dtype, then multiply by the weight.
    normalized = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = norm.weight * normalized.to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)  # bfloat16 tolerances: one rounding step apart at most


def _naive_moe(moe: Step3MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax over the router logits, top-k, (renormalise), sum of the chosen experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.gate.weight @ x[t], dim=-1)
        weights, experts = torch.topk(probs, moe.top_k)
        if moe.norm_expert_weight:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts, strict=True):
            gate = moe.gate_proj.weight[e] @ x[t]
            up = moe.up_proj.weight[e] @ x[t]
            out[t] += w * (moe.down_proj.weight[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("norm_expert_weight", [False, True])
def test_dense_moe_equals_per_token_loop(config, norm_expert_weight):
    config = dataclasses.replace(config, norm_expert_weight=norm_expert_weight)
    moe = _randomize(Step3MoE(config).double())
    x = _randn(2, 9, config.hidden_size)
    with torch.no_grad():
        out = moe(x)
        expected = _naive_moe(moe, x.reshape(-1, config.hidden_size)).reshape(x.shape)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_routing_weights_are_sparse(config):
    moe = _randomize(Step3MoE(config).double())
    with torch.no_grad():
        weights = moe.routing_weights(_randn(17, config.hidden_size))
    assert ((weights > 0).sum(-1) == config.moe_top_k).all()  # exactly top-k experts per token
    assert (weights.sum(-1) < 1).all()  # not renormalised: Step3's published norm_expert_weight is False


def _naive_attention(attn: Step3Attention, config: Step3TextConfig, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V with the single KV head shared by every query head."""
    batch, seq, _ = x.shape
    heads, d = config.num_attention_heads, config.head_dim
    qkv = x @ attn.qkv_proj.weight.T
    q_low, k, v = qkv[..., : config.share_q_dim], qkv[..., config.share_q_dim : -d], qkv[..., -d:]
    q_low = attn.inter_norm.weight * q_low / torch.sqrt(q_low.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    q = (q_low @ attn.wq.weight.T).reshape(batch, seq, heads, d)

    # Rotary, written out: dimension i pairs with i + d/2 and turns by position * theta^(-2i/d).
    position = torch.arange(seq, dtype=torch.float64)[:, None]
    angle = position * config.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [seq, d/2]
    cos, sin = torch.cos(angle)[None, :, None, :], torch.sin(angle)[None, :, None, :]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        first, second = t[..., : d // 2], t[..., d // 2 :]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    q, k = rotate(q), rotate(k.reshape(batch, seq, 1, d))
    scores = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) / math.sqrt(d)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkd->bqhd", probs, v).reshape(batch, seq, heads * d)
    return out @ attn.o_proj.weight.T


def test_attention_equals_naive_float64(config):
    attn = _randomize(Step3Attention(config).double())
    x = _randn(2, 7, config.hidden_size)
    inv_freq = config.rope_theta ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    rotary = Step3RotaryEmbedding(config.head_dim, config.rope_theta)
    torch.testing.assert_close(rotary.inv_freq, inv_freq.float())  # HF's float32 frequency table
    rotary = rotary.double()
    with torch.no_grad():  # recomputed in float64 for a tight comparison
        rotary.inv_freq.copy_(inv_freq)
    position_ids = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(position_ids, torch.float64)
        out = attn(x, cos, sin)
        expected = _naive_attention(attn, config, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_explicit_position_ids_match_default(config):
    model = Step3ForCausalLM(config).eval()
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        default = model(ids)
        explicit = model(ids, torch.arange(6).unsqueeze(0).expand(2, -1))
        shifted = model(ids, torch.arange(6).unsqueeze(0) + 100)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, shifted)  # positions do reach the rotary embedding


def test_real_config_layer_kinds_on_meta():
    with torch.device("meta"):
        model = Step3ForCausalLM(Step3TextConfig())
    kinds = [layer.use_moe for layer in model.model.layers]
    assert kinds.count(False) == 5 and kinds[:4] == [False] * 4 and kinds[-1] is False
    total = sum(p.numel() for p in model.parameters())
    assert 310e9 < total < 320e9  # model card: 316B parameters in the LLM
