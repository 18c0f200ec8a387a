import pytest
import torch
from torch._dynamo.testing import CompileCounter

from flagtree_py.models import PRESETS, build_model, build_tiny_model, greedy_generate, real_config, tiny_config
from flagtree_py.models.step3 import Step3ForCausalLM
from flagtree_py.models.tiny import CausalLMLogits, Qwen3OmniThinkerTextForCausalLM

ALL_PRESETS = sorted(PRESETS)
VOCAB = 512


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_models():
    return {name: build_tiny_model(name) for name in ALL_PRESETS}


def test_model_classes(tiny_models):
    assert type(tiny_models["qwen3"].causal_lm).__name__ == "Qwen3ForCausalLM"
    assert type(tiny_models["qwen3-32b"].causal_lm).__name__ == "Qwen3ForCausalLM"
    assert type(tiny_models["qwen3-30b-a3b"].causal_lm).__name__ == "Qwen3MoeForCausalLM"
    assert isinstance(tiny_models["qwen3-omni"], Qwen3OmniThinkerTextForCausalLM)
    assert type(tiny_models["qwen3-omni"].model).__name__ == "Qwen3OmniMoeThinkerTextModel"
    assert isinstance(tiny_models["step3"], Step3ForCausalLM)
    for name in ["qwen3", "qwen3-32b", "qwen3-30b-a3b"]:
        assert isinstance(tiny_models[name], CausalLMLogits)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_tiny_sizes(name):
    config = tiny_config(name)
    assert config.hidden_size == 128 and config.head_dim == 32 and config.num_hidden_layers == 2
    assert config.num_attention_heads == 4 and config.vocab_size == VOCAB
    if name == "step3":
        assert config.num_attention_groups == 1 and config.max_position_embedding >= 4096
        assert (config.moe_num_experts, config.moe_top_k, config.share_expert_dim) == (8, 3, 64)
    else:
        assert config.num_key_value_heads == 2 and config.max_position_embeddings >= 4096
        assert config._attn_implementation == "sdpa"
    if name in ("qwen3-30b-a3b", "qwen3-omni"):
        assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
        assert config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_eval_mode_and_implementations(tiny_models, name):
    model = tiny_models[name]
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    if hasattr(model.config, "_attn_implementation"):
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_build_is_deterministic(tiny_models, name):
    again = build_tiny_model(name)
    reference = tiny_models[name].state_dict()
    assert reference.keys() == again.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    other_seed = build_tiny_model(name, seed=1).state_dict()
    assert not all(torch.equal(reference[k], v) for k, v in other_seed.items())


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("qwen3")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_forward_shape_and_finite(tiny_models, name):
    with torch.no_grad():
        logits = tiny_models[name](_ids(2, 7))
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # not a constant output


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_forward_is_causal(tiny_models, name):
    # Changing the last token must not change the logits of the earlier positions.
    ids = _ids(1, 6)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = tiny_models[name](ids), tiny_models[name](changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", ["qwen3", "step3"])
def test_bfloat16_build(name):
    model = build_tiny_model(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(_ids(1, 5))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_one_graph_static(tiny_models, name):
    with torch.no_grad():
        explanation = torch._dynamo.explain(tiny_models[name])(_ids(1, 8))
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_one_graph_dynamic_over_lengths(tiny_models, name):
    model = tiny_models[name]
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for seq in (3, 5, 8, 13):
            ids = _ids(2, seq, seed=seq)
            torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=0)
    # fullgraph=True raises on any graph break; one frame means no recompilation across lengths.
    assert counter.frame_count == 1
    assert counter.op_count > 50  # the whole decoder, not a stub


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_greedy_generate(tiny_models, name):
    model = tiny_models[name]
    prompt = _ids(2, 4)
    tokens = greedy_generate(model, prompt, new_tokens=5)
    assert tokens.shape == (2, 9) and tokens.dtype == prompt.dtype
    assert torch.equal(tokens[:, :4], prompt)
    # Each generated token is the argmax of the model on the sequence before it.
    with torch.no_grad():
        for step in range(4, 9):
            expected = model(tokens[:, :step])[:, -1].argmax(-1)
            assert torch.equal(tokens[:, step], expected)

    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    assert torch.equal(greedy_generate(compiled, prompt, new_tokens=5), tokens)
    assert counter.frame_count == 1


def test_greedy_generate_bare_hf_model(tiny_models):
    wrapped = tiny_models["qwen3"]
    prompt = _ids(1, 4)
    assert torch.equal(greedy_generate(wrapped.causal_lm, prompt, 3), greedy_generate(wrapped, prompt, 3))


def test_num_layers_override():
    model = build_tiny_model("qwen3-30b-a3b", num_layers=3)
    assert len(model.causal_lm.model.layers) == 3
    assert tiny_config("qwen3-30b-a3b").num_hidden_layers == 2  # the config was not mutated


REAL_SHAPES = {
    # preset: (hidden, layers, q heads, kv heads, head_dim, vocab)
    "qwen3": (4096, 36, 32, 8, 128, 151936),
    "qwen3-32b": (5120, 64, 64, 8, 128, 151936),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 128, 151936),
    "qwen3-omni": (2048, 48, 32, 4, 128, 152064),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_real_config_shapes(name):
    config = real_config(name)
    got = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.vocab_size,
    )
    assert got == REAL_SHAPES[name]
    assert config.rms_norm_eps == 1e-6 and config.rope_parameters["rope_theta"] == 1e6
    if name == "qwen3":
        assert config.intermediate_size == 12288
    if name == "qwen3-32b":
        assert config.intermediate_size == 25600
    if name in ("qwen3-30b-a3b", "qwen3-omni"):
        assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (128, 8, 768)


def test_real_config_step3():
    config = real_config("step3")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (7168, 61, 64)
    assert (config.head_dim, config.share_q_dim, config.num_attention_groups) == (256, 2048, 1)
    assert (config.moe_num_experts, config.moe_top_k, config.moe_intermediate_size) == (48, 3, 5120)
    assert config.share_expert_dim == 5120 and config.intermediate_size == 18432
    assert config.vocab_size == 128815 and config.norm_expert_weight is False
    assert len(config.moe_layer_ids()) == 56  # 61 layers, 5 dense (model card)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_real_shape_build_on_meta(name):
    # Real shapes, one or two layers, on the meta device: checks the structure without the memory.
    model = build_model(real_config(name), dtype=torch.bfloat16, device="meta", num_layers=2)
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params.values())
    if name == "step3":
        assert not model.model.layers[0].use_moe and model.model.layers[1].use_moe  # both kinds exercised
        assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == (2048 + 2 * 256, 7168)
        assert params["model.layers.0.self_attn.wq.weight"].shape == (64 * 256, 2048)
        assert params["model.layers.1.moe.gate_proj.weight"].shape == (48, 5120, 7168)
        return
    hf = model.model if name == "qwen3-omni" else model.causal_lm.model
    config = real_config(name)
    assert len(hf.layers) == 2
    q_proj = hf.layers[0].self_attn.q_proj.weight
    assert q_proj.shape == (config.num_attention_heads * config.head_dim, config.hidden_size)
