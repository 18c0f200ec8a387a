"""The LLM fusions on the graph forms vLLM's model code hands the backend (no vLLM needed).

`VllmAttentionInput` repeats, op for op, what vLLM 0.32's Qwen3 / Step3 attention does before its
attention op with custom ops off (`custom_ops: ["none"]`): one merged qkv linear, split; the per-head
q/k norm of `vllm.ir.ops.rms_norm` on [tokens, heads, head_dim] viewed back to [tokens, hidden]; and
`RotaryEmbedding.forward_static` (neox): cos/sin gathered with `index_select` from `cos_sin_cache`,
the halves combined as `x1 * cos - x2 * sin` / `x2 * cos + x1 * sin` and concatenated, then joined to
the pass-through part. The aten graph is the one saved in tests/serve/data/qwen3.vllm.aten.txt (the
qkv GEMM aside, vLLM's `_C.onednn_mm` there); checked against vLLM's own `forward_static` in the serve
venv: the same aten ops in the same order, bit-equal outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flagtree_py
from flagtree_py.options import CompileOptions
from flagtree_py.passes import PassContext
from flagtree_py.passes.remove_noop_views import remove_noop_views

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, TOKENS = 4, 2, 32, 64, 5


def rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    """vllm.ir.ops.rms_norm (RMSNorm.forward_native with custom ops off)."""
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (x.to(weight.dtype) * weight).to(orig_dtype)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """vLLM's ApplyRotaryEmb.forward_static, neox style."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class VllmAttentionInput(nn.Module):
    def __init__(self, qk_norm: bool, rotary_dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.qk_norm, self.rotary_dim = qk_norm, rotary_dim
        self.qkv_proj = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.q_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        freqs = torch.outer(torch.arange(64).float(), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def rotary(self, positions, query, key):
        """vLLM's RotaryEmbedding.forward_static."""
        positions = positions.flatten()
        num_tokens = positions.shape[0]
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        rotated = []
        for x in (query, key):
            shape = x.shape
            x = x.view(num_tokens, -1, HEAD_DIM)
            x_rot, x_pass = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
            rotated.append(torch.cat((apply_rotary_emb(x_rot, cos, sin), x_pass), dim=-1).reshape(shape))
        return rotated

    def forward(self, positions, hidden_states):
        q, k, v = self.qkv_proj(hidden_states).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        if self.qk_norm:  # vLLM's Qwen3Attention: per-head norm on a [tokens, heads, head_dim] view
            q = rms_norm(q.view(*q.shape[:-1], HEADS, HEAD_DIM), self.q_norm, 1e-6).view(q.shape)
            k = rms_norm(k.view(*k.shape[:-1], KV_HEADS, HEAD_DIM), self.k_norm, 1e-6).view(k.shape)
        q, k = self.rotary(positions, q, k)
        # what unified_attention_with_output receives
        return q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM), v.view(-1, KV_HEADS, HEAD_DIM)


def _tokens_are_symbolic(*tensors: torch.Tensor) -> None:
    """vLLM compiles for a symbolic token count; every other size (heads, experts) is static."""
    for tensor in tensors:
        torch._dynamo.mark_dynamic(tensor, 0)


def _compile(module: nn.Module, dtype: torch.dtype) -> dict:
    module = module.to(dtype)
    positions = torch.tensor([3, 0, 7, 1, 12])  # decode-like: one position per sequence
    hidden = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    _tokens_are_symbolic(positions, hidden)
    with torch.no_grad():
        out = torch.compile(module, backend="flagtree")(positions, hidden)
        ref = module(positions, hidden)
    # fp32: reassociated sums only (the norm's mean); fp16: both round at the same casts, the norm's
    # fp32 sum may round differently at the fp16 store (one fp16 ulp, 2**-10, of values ~1)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() <= tolerance
    (record,) = flagtree_py.report()
    assert record["codegen_fallbacks"] == [] and record["kernel_failures"] == []
    assert record["fusions_split"] == [], "every matched pattern must be one kernel"
    return record


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vllm_qwen3_qk_norm_and_neox_rotary_are_one_kernel_per_projection(dtype):
    record = _compile(VllmAttentionInput(qk_norm=True), dtype)
    passes = record["passes"]
    assert passes["fuse_qk_norm_rope"] == 2  # q and k: norm and rotary in one kernel each
    assert passes["fuse_rope"] == 0 and passes["fuse_rms_norm"] == 0
    # the qkv GEMM, q's norm+rotary, k's norm+rotary, the cos/sin gather (read by both)
    assert passes["partition_fusion_groups"] == 4


def test_vllm_step3_neox_rotary_without_norm_is_one_kernel_per_projection():
    record = _compile(VllmAttentionInput(qk_norm=False), torch.float32)
    passes = record["passes"]
    assert passes["fuse_rope"] == 2 and passes["fuse_qk_norm_rope"] == 0
    assert passes["partition_fusion_groups"] == 4


@pytest.mark.parametrize("qk_norm", [True, False])
def test_partial_rotary_keeps_the_pass_through_part_in_the_kernel(qk_norm):
    """rotary_dim < head_dim: the rotary reads x[..., :rotary_dim] and the pass-through slice is a real part
    of the output (not an empty one): both in the instance's kernel, the norm too where there is one."""
    record = _compile(VllmAttentionInput(qk_norm=qk_norm, rotary_dim=HEAD_DIM // 2), torch.float32)
    passes = record["passes"]
    assert (passes["fuse_qk_norm_rope"], passes["fuse_rope"]) == ((2, 0) if qk_norm else (0, 2))
    assert passes["fuse_rms_norm"] == 0 and passes["partition_fusion_groups"] == 4


def test_reshape_round_trip_reads_the_earlier_tensor():
    """[T, H, D] -> [T, H*D] -> [T, H, D] is the tensor itself; a reshape to another shape stays."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(TOKENS, HEADS, HEAD_DIM)
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    y.meta["val"] = torch.empty(TOKENS, HEADS, HEAD_DIM)
    flat = graph.call_function(torch.ops.aten.view.default, (y, [TOKENS, HEADS * HEAD_DIM]))
    flat.meta["val"] = torch.empty(TOKENS, HEADS * HEAD_DIM)
    back = graph.call_function(torch.ops.aten.view.default, (flat, [TOKENS, -1, HEAD_DIM]))
    back.meta["val"] = torch.empty(TOKENS, HEADS, HEAD_DIM)
    other = graph.call_function(torch.ops.aten.view.default, (flat, [TOKENS, 2, 64]))
    other.meta["val"] = torch.empty(TOKENS, 2, 64)
    out = graph.call_function(torch.ops.aten.add.Tensor, (back, 1.0))
    out.meta["val"] = torch.empty(TOKENS, HEADS, HEAD_DIM)
    graph.output((out, other))
    ctx = PassContext(CompileOptions())
    assert remove_noop_views(graph, ctx)
    assert out.args[0] is y  # the round trip is gone
    assert other in graph.nodes and other.args[0] is flat  # [T, 2, 64] is another tensor shape


EXPERTS, TOP_K = 8, 3


def softmax_topk(router_logits: torch.Tensor, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU router (`_softmax_topk` in fused_moe/router/cpu_router.py): what its graphs hold
    between the router GEMM and `_C.cpu_fused_moe` (Qwen3-MoE renormalizes, Step3 does not)."""
    topk_logit_vals, topk_idx = torch.topk(router_logits, k=TOP_K, dim=-1, sorted=False)
    if renormalize:
        topk_vals = torch.softmax(topk_logit_vals, dim=-1)
    else:
        log_z = torch.logsumexp(router_logits, dim=-1, keepdim=True)
        topk_vals = (topk_logit_vals - log_z).exp()
    return topk_vals.to(torch.float32), topk_idx.to(torch.int32)


@pytest.mark.parametrize("renormalize", [True, False])
def test_vllm_cpu_router_is_one_routing_kernel(renormalize):
    def route(hidden, gate):
        return softmax_topk(hidden @ gate, renormalize)

    hidden, gate = torch.randn(TOKENS, HIDDEN), torch.randn(HIDDEN, EXPERTS)
    _tokens_are_symbolic(hidden)
    with torch.no_grad():
        weights, ids = torch.compile(route, backend="flagtree")(hidden, gate)
        want_weights, want_ids = route(hidden, gate)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    # sorted=False: the order of the k (weight, expert) pairs is free; the experts and their weights are not
    dense = torch.zeros(TOKENS, EXPERTS).scatter(-1, ids.long(), weights)
    want = torch.zeros(TOKENS, EXPERTS).scatter(-1, want_ids.long(), want_weights)
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    assert torch.allclose(dense, want, rtol=1e-5, atol=1e-6)  # float32 exp/sum, reassociated
    (record,) = flagtree_py.report()
    assert record["passes"]["fuse_moe_routing"] == 1
    assert "aten.topk.default" not in record["extern_ops"]
    assert record["codegen_fallbacks"] == [] and record["kernel_failures"] == []


def test_vllm_router_in_half_precision_is_left_alone():
    """A softmax of fp16 top-k logits rounds in fp16: the fused float32 routing would be another result."""
    def route(logits):
        return softmax_topk(logits, True)

    logits = torch.randn(TOKENS, EXPERTS, dtype=torch.float16)
    _tokens_are_symbolic(logits)
    with torch.no_grad():
        torch.compile(route, backend="flagtree")(logits)
    (record,) = flagtree_py.report()
    assert record["passes"]["fuse_moe_routing"] == 0


def _vllm_rotary_op():
    """`torch.ops._C.rotary_embedding`: vLLM's own where vLLM is installed, else a stand-in with its schema
    whose body is RotaryEmbedding.forward_static written into q and k in place (what the kernel computes)."""
    try:
        return torch.ops._C.rotary_embedding.default
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("_C", "FRAGMENT")  # a test stand-in, kept for the process (_LIBRARIES)
    library.define("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!)? key, int head_size, "
                   "Tensor cos_sin_cache, bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()")

    def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
        cos, sin = cos_sin_cache.index_select(0, positions.flatten()).chunk(2, dim=-1)
        rotary_dim = cos_sin_cache.shape[-1]
        for x in (query, key):
            heads = x.view(x.shape[0], -1, head_size)
            rotated = torch.cat((apply_rotary_emb(heads[..., :rotary_dim], cos, sin), heads[..., rotary_dim:]), -1)
            x.copy_(rotated.view(x.shape))

    library.impl("rotary_embedding", rotary_embedding, "CompositeExplicitAutograd")
    _LIBRARIES.append(library)
    torch.library.register_fake("_C::rotary_embedding", lambda *args, **kwargs: None)
    return torch.ops._C.rotary_embedding.default


_LIBRARIES: list = []


class VllmCustomOpRotary(VllmAttentionInput):
    """The same attention input with vLLM's custom ops on: RotaryEmbedding.forward_cuda rotates q and k in
    place with `_C.rotary_embedding` (auto_functionalized_v2 in the graph flagtree receives)."""

    def rotary(self, positions, query, key):
        _vllm_rotary_op()(positions, query, key, HEAD_DIM, self.cos_sin_cache, True)
        return query, key


def test_vllm_custom_op_rotary_is_decomposed_and_fused_with_the_qk_norm():
    """q and k are the norms' outputs: each the whole base of the functionalized op, rewritten."""
    _vllm_rotary_op()
    record = _compile(VllmCustomOpRotary(qk_norm=True), torch.float32)
    passes = record["passes"]
    assert passes["decompose_vllm_rotary"] == 1
    assert passes["fuse_qk_norm_rope"] == 2 and passes["fuse_rope"] == 0
    assert not [op for op in record["extern_ops"] if "rotary_embedding" in op]


def test_vllm_custom_op_rotary_on_slices_of_one_base_stays_vllms():
    """q and k are slices of the qkv output (v another): writing them back into the base is not done,
    so the op stays an extern call (and the graph stays right)."""
    _vllm_rotary_op()
    record = _compile(VllmCustomOpRotary(qk_norm=False), torch.float32)
    assert record["passes"]["decompose_vllm_rotary"] == 0
    assert [op for op in record["extern_ops"] if "rotary_embedding" in op]
