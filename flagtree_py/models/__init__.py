"""Models flagtree compiles: the presets of the FlagOS model cards, built with random weights.

- presets: ModelPreset rows (Hugging Face id, architecture, served name, port, FlagOS release).
- configs: real published shapes and tiny shapes per preset.
- tiny: model builders (`model(input_ids) -> logits`, one Dynamo graph) and greedy decoding.
- step3: a PyTorch Step3 text decoder (transformers has none).
"""

from .configs import real_config, tiny_config
from .presets import PRESETS, ModelPreset, UnknownPresetError, get_preset
from .step3 import Step3ForCausalLM, Step3TextConfig
from .tiny import build_model, build_tiny_model, greedy_generate

__all__ = [
    "PRESETS",
    "ModelPreset",
    "Step3ForCausalLM",
    "Step3TextConfig",
    "UnknownPresetError",
    "build_model",
    "build_tiny_model",
    "get_preset",
    "greedy_generate",
    "real_config",
    "tiny_config",
]
