"""The models flagtree knows by name, one row per FlagOS model card this project follows (DESIGN.md, "Models")."""

from __future__ import annotations

from dataclasses import dataclass

# Values of ModelPreset.architecture: which decoder implementation builds the model (see tiny.build_model).
QWEN3 = "qwen3"  # transformers Qwen3ForCausalLM
QWEN3_MOE = "qwen3_moe"  # transformers Qwen3MoeForCausalLM
QWEN3_OMNI_THINKER_TEXT = "qwen3_omni_moe_thinker_text"  # transformers Qwen3OmniMoeThinkerTextModel + lm_head
STEP3_TEXT = "step3_text"  # flagtree_py.models.step3.Step3ForCausalLM


@dataclass(frozen=True)
class ModelPreset:
    """One servable model: where its weights live, how flagtree builds it, how `flagtree serve` exposes it."""

    name: str  # the preset name users type: `flagtree serve qwen3`
    hf_id: str  # Hugging Face repository of the original weights
    architecture: str  # one of the constants above
    served_name: str  # model name of the OpenAI-compatible endpoint, as on the FlagOS card
    port: int  # port of the endpoint, as on the FlagOS card
    release: str  # vendor of the FlagOS release the card describes: "nvidia", "metax" or "iluvatar"


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("qwen3", "Qwen/Qwen3-8B", QWEN3, "Qwen3-8B-metax-flagos", 8000, "metax"),
        ModelPreset("qwen3-32b", "Qwen/Qwen3-32B", QWEN3, "Qwen3-32B-nvidia-flagos", 9010, "nvidia"),
        ModelPreset(
            "qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", QWEN3_MOE, "Qwen3-30B-A3B-iluvatar-flagos", 8000, "iluvatar"
        ),
        # Only the text path (the MoE "thinker" decoder) is compiled; audio/vision towers and the talker are not.
        ModelPreset(
            "qwen3-omni",
            "Qwen/Qwen3-Omni-30B-A3B-Instruct",
            QWEN3_OMNI_THINKER_TEXT,
            "Qwen3-Omni-30B-A3B-Instruct-nvidia-flagos",
            9010,
            "nvidia",
        ),
        ModelPreset("step3", "stepfun-ai/step3", STEP3_TEXT, "step3-nvidia-flagos", 9010, "nvidia"),
    )
}


class UnknownPresetError(KeyError, ValueError):
    """Raised for a preset name flagtree does not know; a KeyError and a ValueError, so either catch works."""

    def __str__(self) -> str:  # KeyError's default str() would wrap the message in quotes
        return str(self.args[0])


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; raises UnknownPresetError naming the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise UnknownPresetError(f"unknown model preset {name!r}; known presets: {known}") from None
