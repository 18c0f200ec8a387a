"""A faithful eager PyTorch port of the Step3 text decoder (stepfun-ai/step3), for tests and benchmarks.

transformers ships no Step3 text model (only Step3p7 / Step3.5, a different architecture), so this file
re-implements the decoder that vLLM serves: `vllm/model_executor/models/step3_text.py` (vllm-project/vllm),
cross-checked against sglang's `python/sglang/srt/models/step3_vl.py`. What makes Step3 unusual:

- Multi-matrix factorization attention (MFA): one fused projection gives a *low-rank* query (share_q_dim)
  plus a single key head and a single value head; the query goes through an RMSNorm (`inter_norm`) and an
  up-projection (`wq`) to num_heads * head_dim. All 64 query heads share the one KV head.
- MoE layers (moe_layers_enum) add an always-on shared expert to the routed experts; routing is
  softmax -> top-k, renormalised only when `norm_expert_weight` is set (False in the published config).

The routed experts are computed *densely*: every expert runs on every token and the routing weights,
scattered into a dense [tokens, experts] matrix, zero out the experts a token did not choose. That costs
num_experts / top_k times the FLOPs of a sparse dispatch but has no data-dependent control flow, so Dynamo
captures the whole model in one graph for any sequence length. The result equals the sparse computation up
to floating-point summation order (tests/models/test_step3.py checks it against a per-token loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Layers 4..59 are MoE in the published model: 61 layers of which 5 dense (0-3 and 60), as the model card says.
_PUBLISHED_MOE_LAYERS = ",".join(str(i) for i in range(4, 60))


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    # Norms, rotary angles and router softmax run in float32 for bf16/fp16/fp32 models, as in HF and
    # vLLM; float64 stays float64 so that float64 tests can compare against references tightly.
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class Step3TextConfig:
    """The text-decoder fields of stepfun-ai/step3's config.json (its `text_config`).

    Defaults are the published values. Source: vLLM's `Step3TextConfig`
    (`vllm/transformers_utils/configs/step3_vl.py`), whose defaults mirror the checkpoint's config.json, and
    the stepfun-ai/step3 model card (61 layers, 5 dense, hidden 7168, MFA with low-rank query 2048, 64 query
    heads, head dim 256, 48 experts, top-3, one shared expert, 65536 context, DeepSeek-V3 tokenizer).
    """

    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (non-MoE layers)
    num_attention_heads: int = 64
    num_attention_groups: int = 1  # number of KV heads: MFA shares one K and one V head across all heads
    num_hidden_layers: int = 61
    max_seq_len: int = 65536
    vocab_size: int = 128815
    rms_norm_eps: float = 1e-5
    moe_intermediate_size: int = 5120
    moe_num_experts: int = 48
    moe_top_k: int = 3
    rope_theta: float = 500000.0
    max_position_embedding: int = 65536
    share_expert_dim: int = 5120
    share_q_dim: int = 2048  # low-rank query width
    head_dim: int = 256
    norm_expert_weight: bool = False  # renormalise the top-k routing weights to sum to 1
    moe_layers_enum: str = _PUBLISHED_MOE_LAYERS  # comma-separated MoE layer ids, as in config.json
    initializer_range: float = 0.02  # std of the random weights we draw (there is no checkpoint to load)

    def __post_init__(self) -> None:
        if self.num_attention_groups != 1:
            # vLLM's Step3TextAttention raises for anything else too.
            raise ValueError(f"Step3 attention has exactly one KV head, got {self.num_attention_groups}")
        if not 0 < self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in 1..moe_num_experts={self.moe_num_experts}")

    def moe_layer_ids(self) -> frozenset[int]:
        """Indices of the layers whose MLP is the MoE block (routed experts + shared expert)."""
        return frozenset(int(i) for i in self.moe_layers_enum.split(",") if i.strip())

    def truncated(self, num_layers: int) -> Step3TextConfig:
        """The same shapes with `num_layers` layers, for real-shape benchmarks that cannot afford 61 layers.

        Taking the first layers would give only dense layers (the model's first four are dense), so a
        truncated model keeps one dense layer first and makes every later layer MoE: both kinds get measured.
        """
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        moe_layers = ",".join(str(i) for i in range(1, num_layers))
        return dataclasses.replace(self, num_hidden_layers=num_layers, moe_layers_enum=moe_layers)


class Step3RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as HF's Llama/Qwen RMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(_at_least_float32(input_dtype))
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation (vLLM's get_rope default, is_neox_style=True): halves, not interleaved pairs."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Step3RotaryEmbedding(nn.Module):
    """cos/sin tables for full-width rotary embedding on head_dim (Step3 rotates the whole head)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 (positions up to 65536 lose precision in bf16), tables cast to the model dtype.
        compute_dtype = _at_least_float32(dtype)
        freqs = position_ids[..., None].to(compute_dtype) * self.inv_freq.to(compute_dtype)  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Step3Attention(nn.Module):
    """Multi-matrix factorization attention: low-rank normalised query, one shared KV head."""

    def __init__(self, config: Step3TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_size = config.share_q_dim
        self.kv_size = config.num_attention_groups * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.inter_norm = Step3RMSNorm(self.q_size, config.rms_norm_eps)
        self.wq = nn.Linear(self.q_size, self.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.wq(self.inter_norm(q))

        q = q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = k.view(batch, seq_len, 1, self.head_dim).transpose(1, 2)  # [b, 1, s, d]
        v = v.view(batch, seq_len, 1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        # The single KV head is broadcast to every query head; expand is a view (no copy) and, unlike
        # SDPA's enable_gqa flag, is understood by every backend this project lowers to.
        k = k.expand(batch, self.num_heads, seq_len, self.head_dim)
        v = v.expand(batch, self.num_heads, seq_len, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class Step3MLP(nn.Module):
    """SwiGLU MLP; used for dense layers (intermediate_size) and the shared expert (share_expert_dim)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExpertWeight(nn.Module):
    """One [num_experts, out_features, in_features] weight; a module so that state-dict keys read
    `moe.gate_proj.weight` etc., the checkpoint's names (see vLLM's expert_params_mapping)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))


class Step3MoE(nn.Module):
    """Routed experts: router -> softmax -> top-k (-> optional renormalise) -> dense weighted expert sum."""

    def __init__(self, config: Step3TextConfig) -> None:
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.norm_expert_weight = config.norm_expert_weight
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = nn.Linear(hidden, self.num_experts, bias=False)  # the router
        self.gate_proj = StackedExpertWeight(self.num_experts, inter, hidden)
        self.up_proj = StackedExpertWeight(self.num_experts, inter, hidden)
        self.down_proj = StackedExpertWeight(self.num_experts, hidden, inter)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [tokens, num_experts] routing matrix: the top-k weights in place, zeros elsewhere."""
        router_logits = self.gate(x)
        # vLLM's fused top-k softmax works in float32 whatever the model dtype.
        probs = torch.softmax(router_logits.to(_at_least_float32(x.dtype)), dim=-1)
        top_weights, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_expert_weight:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(-1, top_ids, top_weights)
        return dense.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [tokens, hidden]
        weights = self.routing_weights(x)  # [tokens, experts]
        # Every expert on every token: [experts, tokens, inter] via one batched matmul per projection.
        gate = torch.matmul(x.unsqueeze(0), self.gate_proj.weight.transpose(1, 2))
        up = torch.matmul(x.unsqueeze(0), self.up_proj.weight.transpose(1, 2))
        expert_out = torch.matmul(F.silu(gate) * up, self.down_proj.weight.transpose(1, 2))  # [e, t, hidden]
        out = (expert_out * weights.t().unsqueeze(-1)).sum(dim=0)
        return out.reshape(shape)


class Step3DecoderLayer(nn.Module):
    def __init__(self, config: Step3TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = Step3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Step3Attention(config)
        self.post_attention_layernorm = Step3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.use_moe = layer_idx in config.moe_layer_ids()
        if self.use_moe:
            self.moe = Step3MoE(config)
            self.share_expert = Step3MLP(config.hidden_size, config.share_expert_dim)
        else:
            self.mlp = Step3MLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Pre-norm residual blocks; vLLM's fused add+norm residual passing computes the same values.
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin)
        x = self.post_attention_layernorm(hidden_states)
        if self.use_moe:
            mlp_out = self.share_expert(x) + self.moe(x)
        else:
            mlp_out = self.mlp(x)
        return hidden_states + mlp_out


class Step3TextModel(nn.Module):
    def __init__(self, config: Step3TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Step3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Step3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Step3RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin)
        return self.norm(hidden_states)


class Step3ForCausalLM(nn.Module):
    """Step3 text decoder with its (untied) LM head; forward(input_ids) returns logits [batch, seq, vocab]."""

    def __init__(self, config: Step3TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Step3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # Same scheme as HF's PreTrainedModel: N(0, initializer_range) for matrices, ones for norms.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, StackedExpertWeight)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Step3RMSNorm):
            nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, position_ids))
