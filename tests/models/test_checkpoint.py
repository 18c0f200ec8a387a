"""Tiny checkpoints load with transformers, are built once, and refuse what vLLM cannot serve."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flagtree_py.models import build_tiny_model
from flagtree_py.models.checkpoint import build_tiny_checkpoint, is_complete


@pytest.mark.slow
def test_qwen3_checkpoint_loads_with_transformers_and_matches_the_tiny_model(tmp_path):
    folder = build_tiny_checkpoint("qwen3", root=tmp_path)
    assert is_complete(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer("The quick brown fox jumps", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "The quick brown fox jumps"  # byte-level BPE round-trips
    assert ids.max() < 512 and len(tokenizer) <= 512
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    assert config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the same seed and config as build_tiny_model: the saved weights are the tiny model's
    with torch.no_grad():
        expected = build_tiny_model("qwen3")(ids)
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, expected)


def test_a_complete_checkpoint_is_reused_and_an_incomplete_one_rebuilt(tmp_path):
    folder = build_tiny_checkpoint("step3", root=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "step3_text" and config["architectures"] == ["Step3TextForCausalLM"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_checkpoint("step3", root=tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    (folder / "flagtree-checkpoint.json").unlink()  # as if a build had been interrupted
    assert build_tiny_checkpoint("step3", root=tmp_path) == folder and is_complete(folder)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no scratch folder left behind


def test_qwen3_omni_and_unknown_presets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multimodal thinker"):
        build_tiny_checkpoint("qwen3-omni", root=tmp_path)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_tiny_checkpoint("llama", root=tmp_path)
