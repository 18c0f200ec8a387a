"""Random-weight models of the presets: tiny ones for tests, real-shape ones (few layers) for benchmarks.

Every model built here has the same calling convention, `model(input_ids) -> logits` with logits of shape
[batch, seq, vocab], and Dynamo captures it in one graph with no break, at static or dynamic sequence
length (tests/models/test_tiny.py checks both). HF causal LMs are wrapped to get there: their forward
returns an output dataclass and, unless told `use_cache=False`, builds a DynamicCache.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel

from .configs import ATTN_IMPLEMENTATION, EXPERTS_IMPLEMENTATION, ModelConfig, real_config, tiny_config
from .step3 import Step3ForCausalLM, Step3TextConfig

__all__ = [
    "CausalLMLogits",
    "Qwen3OmniThinkerTextForCausalLM",
    "build_model",
    "build_tiny_model",
    "greedy_generate",
    "real_config",
    "tiny_config",
]


class CausalLMLogits(nn.Module):
    """Wraps an HF causal LM so that forward(input_ids) returns the logits tensor, with no KV cache."""

    def __init__(self, causal_lm: PreTrainedModel) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.config = causal_lm.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm(input_ids=input_ids, use_cache=False).logits


class Qwen3OmniThinkerTextForCausalLM(nn.Module):
    """The text path of the Qwen3-Omni thinker: its decoder plus the thinker's LM head.

    transformers keeps the thinker's lm_head in Qwen3OmniMoeThinkerForConditionalGeneration, next to the
    audio and vision towers; this module takes only the decoder (Qwen3OmniMoeThinkerTextModel) and the
    head, under the same attribute names (`model`, `lm_head`), so thinker weights map onto it by prefix.
    """

    def __init__(self, config: Qwen3OmniMoeTextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3OmniMoeThinkerTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.lm_head(hidden_states)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in `dtype`: building a real-shape model in float32 first and casting
    # would need twice the memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _with_num_layers(config: ModelConfig, num_layers: int) -> ModelConfig:
    if isinstance(config, Step3TextConfig):
        return config.truncated(num_layers)
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:  # Qwen3: one attention type per layer
        config.layer_types = config.layer_types[:num_layers]
    return config


def _instantiate(config: ModelConfig, experts_implementation: str) -> nn.Module:
    if isinstance(config, Step3TextConfig):
        return Step3ForCausalLM(config)
    config = copy.deepcopy(config)
    config._attn_implementation = ATTN_IMPLEMENTATION
    config._experts_implementation = experts_implementation
    if isinstance(config, Qwen3OmniMoeTextConfig):
        return Qwen3OmniThinkerTextForCausalLM(config)
    if isinstance(config, Qwen3MoeConfig):
        return CausalLMLogits(Qwen3MoeForCausalLM(config))
    if isinstance(config, Qwen3Config):
        return CausalLMLogits(Qwen3ForCausalLM(config))
    raise TypeError(f"no model class for config type {type(config).__name__}")


def build_model(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
    seed: int = 0,
    experts_implementation: str = EXPERTS_IMPLEMENTATION,
) -> nn.Module:
    """Build a random-weight, eval-mode model from `config`: forward(input_ids) -> logits.

    `num_layers` overrides the config's layer count (real shapes with a few layers for benchmarks; a
    truncated Step3 keeps one dense layer then MoE layers, see Step3TextConfig.truncated). The weights
    depend only on `seed`, `config` and `dtype`; device="meta" builds the structure without memory.
    Parameters do not require grad: flagtree compiles inference graphs.
    """
    if num_layers is not None:
        config = _with_num_layers(config, num_layers)
    device = torch.device(device)
    # fork_rng: seeding must not disturb the caller's random stream.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        model = _instantiate(config, experts_implementation)
    return model.eval().requires_grad_(False)


def build_tiny_model(
    preset: str, dtype: torch.dtype = torch.float32, seed: int = 0, num_layers: int = 2
) -> nn.Module:
    """A tiny random-weight model of `preset` on the CPU (see tiny_config): forward(input_ids) -> logits."""
    return build_model(tiny_config(preset), dtype=dtype, num_layers=num_layers, seed=seed)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule keeps the original here


def _next_token_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(_unwrap(model), PreTrainedModel):  # a bare HF model, not one of ours
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[:, -1, :]


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: each step runs the model on the whole sequence so far.

    Returns the prompt followed by the `new_tokens` generated ids, shape [batch, prompt_len + new_tokens].
    Works with eager or torch.compile'd models (ours, or bare HF causal LMs, called with use_cache=False).
    Quadratic in length: meant for consistency checks (compiled vs eager tokens), not for speed.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    # A fresh tensor, not a view of the caller's: Dynamo guards on a view's base, so a sliced prompt
    # followed by concatenated (non-view) sequences would cost a recompilation.
    tokens = input_ids.clone()
    for _ in range(new_tokens):
        next_token = _next_token_logits(model, tokens).argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, next_token.to(tokens.dtype)], dim=1)
    return tokens
