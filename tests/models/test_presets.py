import dataclasses

import pytest

from flagtree_py.models.presets import PRESETS, ModelPreset, UnknownPresetError, get_preset

# The table of DESIGN.md ("Models"), from the FlagOS model cards.
EXPECTED = {
    "qwen3": ("Qwen/Qwen3-8B", "metax", "Qwen3-8B-metax-flagos", 8000),
    "qwen3-32b": ("Qwen/Qwen3-32B", "nvidia", "Qwen3-32B-nvidia-flagos", 9010),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "iluvatar", "Qwen3-30B-A3B-iluvatar-flagos", 8000),
    "qwen3-omni": (
        "Qwen/Qwen3-Omni-30B-A3B-Instruct",
        "nvidia",
        "Qwen3-Omni-30B-A3B-Instruct-nvidia-flagos",
        9010,
    ),
    "step3": ("stepfun-ai/step3", "nvidia", "step3-nvidia-flagos", 9010),
}


def test_exactly_the_card_rows():
    assert set(PRESETS) == set(EXPECTED)
    for name, (hf_id, release, served_name, port) in EXPECTED.items():
        preset = PRESETS[name]
        assert (preset.name, preset.hf_id, preset.release, preset.served_name, preset.port) == (
            name,
            hf_id,
            release,
            served_name,
            port,
        )


def test_architectures():
    assert {name: p.architecture for name, p in PRESETS.items()} == {
        "qwen3": "qwen3",
        "qwen3-32b": "qwen3",
        "qwen3-30b-a3b": "qwen3_moe",
        "qwen3-omni": "qwen3_omni_moe_thinker_text",
        "step3": "step3_text",
    }


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["qwen3"].port = 1  # type: ignore[misc]
    assert isinstance(PRESETS["qwen3"], ModelPreset)
    assert hash(PRESETS["qwen3"]) == hash(get_preset("qwen3"))


def test_get_preset():
    assert get_preset("step3") is PRESETS["step3"]


@pytest.mark.parametrize("error", [KeyError, ValueError, UnknownPresetError])
def test_unknown_preset_names_the_known_ones(error):
    with pytest.raises(error) as info:
        get_preset("llama3")
    message = str(info.value)
    assert "'llama3'" in message
    for name in PRESETS:
        assert name in message
