"""`flagtree demo`: the main job end to end through the command line, and its input errors.

The demo runs take seconds each on the CPU machine (model import, Dynamo capture, kernels in Triton's
interpreter), so they are marked slow; they still run in CI.
"""

import copy
import json

import pytest
import torch

from flagtree_py.cli.demo import exit_status, format_summary
from flagtree_py.models.presets import PRESETS

CUDA = torch.cuda.is_available()
# float32 logits of the tiny random models are about 1 in size; compiled and eager only reorder float32
# sums (hidden size 128), which moves a logit by about 1e-6. 1e-4 leaves room and still catches a wrong kernel.
FLOAT32_LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def demo_json(run_cli):
    """One run of the README's command with --json (defaults: qwen3, 8 tokens, 12-token prompt)."""
    return run_cli("demo", "--json")


def _summary(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # the whole of stdout is one JSON object


@pytest.mark.slow
def test_demo_json_compiles_and_matches_eager(demo_json):
    summary = _summary(demo_json)
    assert (summary["preset"], summary["dtype"]) == ("qwen3", "float32")
    assert (summary["new_tokens"], summary["prompt_length"]) == (8, 12)
    assert summary["device"] == ("cuda" if CUDA else "cpu")
    if not CUDA:
        assert summary["target"] == "interpreter" and summary["executor"] == "interpreter"
        assert "cpu" in summary["target_reason"]
        assert "not speed" in summary["timing_note"]
    # dynamic=True: one graph serves every sequence length from 12 to 19 tokens
    assert summary["graphs_compiled"] == 1 and summary["graph_fallbacks"] == []
    assert summary["dynamic_symbols"]
    assert summary["triton_kernels"] > 0
    assert 0 < summary["work_nodes_in_kernels"] <= summary["work_nodes"]
    assert summary["lowered_fraction"] == round(summary["work_nodes_in_kernels"] / summary["work_nodes"], 4)
    assert summary["extern_ops"] and all(count > 0 for count in summary["extern_ops"].values())
    assert "operator.getitem" not in summary["extern_ops"]
    assert len(summary["prompt"]) == 12 and all(0 <= t < summary["vocab_size"] for t in summary["prompt"])
    assert len(summary["eager_tokens"]) == 8
    assert summary["compiled_tokens"] == summary["eager_tokens"] and summary["tokens_agree"]
    assert summary["first_difference"] is None and summary["eager_margin_at_difference"] is None
    assert summary["max_abs_logit_diff"] < FLOAT32_LOGIT_TOLERANCE
    assert summary["compile_s"] > 0 and summary["flagtree_compile_s"] > 0
    assert summary["eager_tokens_per_s"] > 0 and summary["compiled_tokens_per_s"] > 0
    assert summary["versions"]["torch"] == torch.__version__


@pytest.mark.slow
def test_demo_reports_progress_on_stderr(demo_json):
    stderr = demo_json.stderr
    assert "compiling" in stderr
    assert "compiled: token 8/8" in stderr and "eager: token 8/8" in stderr


@pytest.mark.slow
def test_demo_summary(demo_json, run_cli, flagtree_script):
    """The readable summary, through the installed console script where there is one (`flagtree demo`,
    as the README says); the same seed gives the same prompt and so the same first tokens as --json."""
    result = run_cli("demo", "--tokens", "3", script=flagtree_script is not None)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("flagtree demo: qwen3 (Qwen/Qwen3-8B architecture, tiny random weights")
    for label in ("target", "graphs", "kernels", "in kernels", "extern ops", "compile", "tokens/s", "greedy tokens"):
        assert f"\n  {label} " in out
    assert "Triton kernels" in out
    assert f"compiled == eager, 3 of 3: {_summary(demo_json)['eager_tokens'][:3]}" in out
    if not CUDA:
        assert "correctness, not speed" in out


@pytest.mark.slow
def test_demo_requested_target(run_cli):
    result = run_cli("demo", "--target", "metax", "--tokens", "2", "--prompt-length", "4", "--json")
    summary = _summary(result)
    assert (summary["target"], summary["target_vendor"]) == ("metax-c500", "metax")
    assert summary["target_reason"] == "requested: metax"
    assert summary["requested_target"] == "metax"
    assert summary["triton_kernels"] > 0 and summary["tokens_agree"]


@pytest.mark.slow
def test_summary_and_exit_status_when_tokens_differ(demo_json):
    summary = _summary(demo_json)
    assert exit_status(summary) == 0
    differ = copy.deepcopy(summary)
    differ["compiled_tokens"][3] = (differ["eager_tokens"][3] + 1) % differ["vocab_size"]
    differ.update(tokens_agree=False, first_difference=3, eager_margin_at_difference=1e-3, max_abs_logit_diff=2e-3)
    assert exit_status(differ) == 1
    text = format_summary(differ)
    assert "DIFFER from token 4 of 8" in text and "near tie" in text
    assert str(differ["compiled_tokens"]) in text and str(differ["eager_tokens"]) in text
    fell_back = copy.deepcopy(summary)
    fell_back["graph_fallbacks"] = ["LoweringError: something"]
    assert exit_status(fell_back) == 1
    assert "fell back to eager aten: LoweringError: something" in format_summary(fell_back)


def test_unknown_preset_is_one_line_naming_the_presets(run_cli):
    result = run_cli("demo", "--preset", "llama-9000")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flagtree demo: error: unknown model preset 'llama-9000'")
    for name in PRESETS:
        assert name in lines[0]


@pytest.mark.skipif(CUDA, reason="bfloat16 is refused only off a GPU")
def test_bfloat16_on_cpu_is_refused(run_cli):
    result = run_cli("demo", "--dtype", "bfloat16")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfloat16" in lines[0] and "CUDA" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "argument --tokens: expected a positive integer, got '0'"),
        (["--prompt-length", "twelve"], "argument --prompt-length: expected a positive integer"),
        (["--target", "tpu"], "unknown flagtree target 'tpu'; known: "),
        (["--dtype", "float64"], "argument --dtype: invalid choice"),
    ],
)
def test_bad_arguments_exit_2(run_cli, args, message):
    result = run_cli("demo", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flagtree demo: error: ") and message in last


@pytest.mark.gpu
@pytest.mark.slow
def test_demo_on_gpu(run_cli):
    summary = _summary(run_cli("demo", "--json"))
    assert summary["device"] == "cuda" and summary["executor"] == "triton"
    assert summary["triton_kernels"] > 0 and summary["kernel_failures"] == []
    assert summary["tokens_agree"] and summary["max_abs_logit_diff"] < FLOAT32_LOGIT_TOLERANCE


@pytest.mark.gpu
@pytest.mark.slow
def test_demo_bfloat16_on_gpu(run_cli):
    result = run_cli("demo", "--dtype", "bfloat16", "--json")
    # bfloat16 rounding can flip a near-tied greedy token of a random-weight model: exit 1 is then honest
    assert result.returncode in (0, 1), result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "bfloat16" and summary["triton_kernels"] > 0
    # bfloat16 keeps 8 significant bits: a logit near 1 is off by up to 2**-8 per rounding; a few roundings apart
    assert summary["max_abs_logit_diff"] < 0.1
