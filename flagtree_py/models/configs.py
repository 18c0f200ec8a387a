"""Model configurations per preset: the real published shapes, and tiny ones of the same architecture.

No weights can be downloaded on the project's machines, so both are built with random weights:
tiny configs for tests (CPU, seconds), real configs for benchmarks (usually with a few layers only).
"""

from __future__ import annotations

from transformers import PretrainedConfig, Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

from .presets import QWEN3, QWEN3_MOE, QWEN3_OMNI_THINKER_TEXT, STEP3_TEXT, get_preset
from .step3 import Step3TextConfig

ModelConfig = PretrainedConfig | Step3TextConfig  # what real_config / tiny_config return

# Every model is built with SDPA attention (no data-dependent kernel choice). Note for the compiler: under
# torch.compile with torch < 2.14, HF never takes its `is_causal=True` shortcut; create_causal_mask builds
# an explicit boolean [batch, 1, seq, seq] mask from aranges (causal, ANDed with a "packed sequence" check
# on position_ids that is always true for our inputs) and calls SDPA with attn_mask and is_causal=False.
# No graph break and no data-dependent shape, but attention lowering sees a mask. Step3 (ours) uses
# is_causal=True directly.
ATTN_IMPLEMENTATION = "sdpa"

# transformers 5.x dispatches MoE experts through `config._experts_implementation`:
# - "eager" loops in Python over the experts that received tokens (`nonzero()` then `for`): a graph break
#   and a data-dependent trip count;
# - "grouped_mm" (the default when available) sorts tokens by expert and calls torch's grouped GEMM; under
#   torch.compile with weights in any dtype but bfloat16 it falls back to the opaque custom op
#   `transformers::grouped_mm_fallback`, which loops over experts through `.tolist()` inside the op;
# - "batched_mm" gathers each (token, expert) pair's weights and runs plain `bmm`s: only core aten ops,
#   static shapes ([tokens * top_k, ...]), the same arithmetic as eager. We use it.
# Its cost: the gathered weights take tokens * top_k * 3 * hidden * moe_intermediate elements, fine for
# tiny models and decode-sized batches but tens of GB for a real-shape prefill of hundreds of tokens; pass
# experts_implementation="grouped_mm" to build_model for those (in bf16 on sm80+ GPUs transformers then
# calls torch.nn.functional.grouped_mm; see its _can_use_grouped_mm).
EXPERTS_IMPLEMENTATION = "batched_mm"

# Tiny sizes: powers of two; head_dim 32 is the smallest head size vLLM's CPU attention accepts
# (32/64/80/96/112/128); max positions stay >= 4096 so serving tests can use realistic context limits.
_TINY = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "intermediate_size": 256,
}
_TINY_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True}
_HF_COMMON = {"attn_implementation": ATTN_IMPLEMENTATION, "tie_word_embeddings": False}


def _qwen3_omni_rope(theta: float, mrope_section: list[int]) -> dict:
    # Multimodal RoPE: the rotary half-dims are split between temporal/height/width position ids. For text
    # the three ids are equal, so this is plain RoPE; the sections must sum to head_dim / 2.
    return {
        "rope_type": "default",
        "rope_theta": theta,
        "mrope_section": mrope_section,
        "interleaved": True,
        "mrope_interleaved": True,
    }


def _real_qwen3(hidden: int, intermediate: int, layers: int, heads: int) -> Qwen3Config:
    # Shared by Qwen3-8B and Qwen3-32B (their config.json on the Hub differ only in these four numbers).
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        **_HF_COMMON,
    )


def real_config(preset: str) -> ModelConfig:
    """The published architecture of `preset` (from each model's config.json on the Hugging Face Hub)."""
    name = get_preset(preset).name
    if name == "qwen3":  # Qwen/Qwen3-8B
        return _real_qwen3(hidden=4096, intermediate=12288, layers=36, heads=32)
    if name == "qwen3-32b":  # Qwen/Qwen3-32B
        return _real_qwen3(hidden=5120, intermediate=25600, layers=64, heads=64)
    if name == "qwen3-30b-a3b":  # Qwen/Qwen3-30B-A3B: every layer MoE, 128 experts, top-8
        return Qwen3MoeConfig(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            vocab_size=151936,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            experts_implementation=EXPERTS_IMPLEMENTATION,
            **_HF_COMMON,
        )
    if name == "qwen3-omni":
        # thinker_config.text_config of Qwen/Qwen3-Omni-30B-A3B-Instruct: the same MoE decoder shape as
        # Qwen3-30B-A3B (48 layers, 32/4 heads, 128 experts top-8), a 152064-token vocabulary and M-RoPE.
        return Qwen3OmniMoeTextConfig(
            hidden_size=2048,
            intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            vocab_size=152064,
            max_position_embeddings=65536,
            rms_norm_eps=1e-6,
            rope_parameters=_qwen3_omni_rope(1000000.0, [24, 20, 20]),
            experts_implementation=EXPERTS_IMPLEMENTATION,
            **_HF_COMMON,
        )
    return Step3TextConfig()  # step3: the dataclass defaults are the published values


def tiny_config(preset: str) -> ModelConfig:
    """A tiny configuration of `preset`'s architecture (2 layers, hidden 128, vocab 512) for CPU tests."""
    architecture = get_preset(preset).architecture
    if architecture == QWEN3:
        return Qwen3Config(**_TINY, **_HF_COMMON)
    if architecture == QWEN3_MOE:
        return Qwen3MoeConfig(**_TINY, **_TINY_MOE, experts_implementation=EXPERTS_IMPLEMENTATION, **_HF_COMMON)
    if architecture == QWEN3_OMNI_THINKER_TEXT:
        return Qwen3OmniMoeTextConfig(
            **_TINY,
            **_TINY_MOE,
            # [24, 20, 20] scaled from head_dim 128 to 32; the split does not matter for text positions.
            rope_parameters=_qwen3_omni_rope(1000000.0, [6, 5, 5]),
            experts_implementation=EXPERTS_IMPLEMENTATION,
            **_HF_COMMON,
        )
    if architecture == STEP3_TEXT:
        # Layer 0 dense, layer 1 MoE; Step3's real top-3 routing and its shared expert are kept.
        return Step3TextConfig(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_attention_groups=1,
            num_hidden_layers=2,
            max_seq_len=4096,
            vocab_size=512,
            moe_intermediate_size=64,
            moe_num_experts=8,
            moe_top_k=3,
            max_position_embedding=4096,
            share_expert_dim=64,
            share_q_dim=64,
            head_dim=32,
            moe_layers_enum="1",
        )
    raise AssertionError(f"no tiny config for architecture {architecture!r}")  # presets.py lists them all
