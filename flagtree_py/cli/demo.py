"""`flagtree demo`: the project's main job, end to end, on an embedded tiny model.

Builds the tiny random-weight model of a preset, compiles it with
`torch.compile(model, backend="flagtree", dynamic=True, options={"target": ...})`, generates tokens
greedily from a fixed-seed random prompt with the compiled and the eager model, and reports what
flagtree did (from `flagtree_py.report()`) and whether the compiled tokens equal eager's: the
consistency check the FlagOS model cards promise, on the same prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter

from flagtree_py import __version__ as flagtree_version
from flagtree_py.cli.common import Progress, error, positive_int

DTYPES = ("float32", "bfloat16", "float16")

CPU_TIMING_NOTE = (
    "CPU: kernels run in Triton's interpreter, so these figures show correctness, not speed; "
    "no KV cache: each token reruns the whole sequence"
)
GPU_TIMING_NOTE = (
    "not a benchmark (see benchmarks/): a tiny model, no KV cache (each token reruns the whole sequence), and "
    "the compiled figure includes Triton compiling its kernels again for sizes it specializes on (a multiple of 16)"
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="compile a tiny random-weight model with flagtree and check its greedy tokens against eager",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
        epilog="exit status: 0 compiled tokens equal eager's, 1 they differ (or a graph was not compiled), "
        "2 bad input",
    )
    parser.add_argument("--preset", default="qwen3",
                        help="model preset (default: qwen3); an unknown name lists the known ones")
    parser.add_argument("--tokens", type=positive_int, default=8, help="tokens to generate (default: 8)")
    parser.add_argument("--prompt-length", type=positive_int, default=12, help="random prompt length (default: 12)")
    parser.add_argument(
        "--target",
        type=_target_name,
        default="auto",
        help="auto (from the device; the default), interpreter, nvidia, metax, iluvatar, or a name from "
        "`flagtree targets`. Off a GPU, kernels lowered for any target run in Triton's interpreter",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weights and activations (default: float32); bfloat16 needs a CUDA GPU. In 16-bit types a "
        "random-weight model's near-tied logits can round to different greedy tokens",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.set_defaults(run=run, prog=parser.prog)


def _target_name(text: str) -> str:
    if text != "auto":
        from flagtree_py.targets import get_target

        try:
            get_target(text)
        except ValueError as problem:
            raise argparse.ArgumentTypeError(str(problem)) from None
    return text


def run(args: argparse.Namespace) -> int:
    import torch

    from flagtree_py.targets import get_target

    # The interpreter target means kernels run on the CPU; any other target uses the GPU where there is one.
    interpreted = args.target != "auto" and get_target(args.target).vendor == "interpreter"
    device = "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
    if args.dtype == "bfloat16" and device == "cpu":
        return error(args.prog, "--dtype bfloat16 needs a CUDA GPU (Triton's interpreter mishandles bfloat16 "
                                "arithmetic on the CPU); use --dtype float32 or float16")
    from flagtree_py.models import UnknownPresetError, get_preset

    try:
        get_preset(args.preset)
    except UnknownPresetError as problem:
        return error(args.prog, str(problem))

    summary = run_demo(args.preset, args.tokens, args.prompt_length, args.target, args.dtype, args.seed, device,
                       Progress(args.prog))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return exit_status(summary)


def exit_status(summary: dict) -> int:
    """0 when flagtree compiled every graph and the greedy tokens equal eager's, else 1."""
    return 0 if summary["tokens_agree"] and not summary["graph_fallbacks"] else 1


def run_demo(preset_name: str, new_tokens: int, prompt_length: int, target: str, dtype_name: str, seed: int,
             device: str, progress: Progress) -> dict:
    """Compile, generate with compiled and eager, compare; returns the summary (what `--json` prints)."""
    import torch

    import flagtree_py
    from flagtree_py.models import build_tiny_model, get_preset, tiny_config

    preset = get_preset(preset_name)
    config = tiny_config(preset_name)
    progress.note(f"building the tiny {preset.name} model ({dtype_name}, {device})")
    model = build_tiny_model(preset_name, dtype=getattr(torch, dtype_name), seed=seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_length), generator=generator).to(device)
    first_record = len(flagtree_py.report())  # records of graphs compiled before (in-process callers) are not ours

    compiled = torch.compile(model, backend="flagtree", dynamic=True, options={"target": target})
    progress.note("compiling (Dynamo capture, flagtree passes and codegen, first run)...")
    start = time.perf_counter()
    with torch.no_grad():
        compiled(prompt)
    _synchronize(device)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        model(prompt)  # eager's own first-call costs stay out of its timing too

    compiled_tokens, compiled_s = _generate(compiled, prompt, new_tokens, progress, "compiled")
    eager_tokens, eager_s = _generate(model, prompt, new_tokens, progress, "eager")

    # Logits of both models on eager's sequence: how far apart they are, and at a differing token how
    # close eager's choice was to the compiled one (a near tie flips on rounding alone).
    with torch.no_grad():
        # contiguous, as generation's inputs were: other strides would cost Dynamo a recompilation
        sequence = eager_tokens[:, :-1].clone(memory_format=torch.contiguous_format)
        compiled_logits = compiled(sequence).float()
        eager_logits = model(sequence).float()
    records = flagtree_py.report()[first_record:]
    compiled_new = compiled_tokens[0, prompt_length:].tolist()
    eager_new = eager_tokens[0, prompt_length:].tolist()
    first_difference = next((i for i, (c, e) in enumerate(zip(compiled_new, eager_new)) if c != e), None)
    eager_margin = None
    if first_difference is not None:
        row = eager_logits[0, prompt_length - 1 + first_difference]
        eager_margin = (row[eager_new[first_difference]] - row[compiled_new[first_difference]]).item()

    summary = {
        "preset": preset.name,
        "model": f"{preset.hf_id} architecture, tiny random weights",
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "device": device,
        "dtype": dtype_name,
        "seed": seed,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "requested_target": target,
    }
    summary.update(_compile_facts(records))
    summary.update({
        "compile_s": round(compile_s, 3),
        "eager_tokens_per_s": round(new_tokens / eager_s, 2),
        "compiled_tokens_per_s": round(new_tokens / compiled_s, 2),
        "timing_note": CPU_TIMING_NOTE if device == "cpu" else GPU_TIMING_NOTE,
        "prompt": prompt[0].tolist(),
        "eager_tokens": eager_new,
        "compiled_tokens": compiled_new,
        "tokens_agree": compiled_new == eager_new,
        "first_difference": first_difference,
        "eager_margin_at_difference": eager_margin,
        "max_abs_logit_diff": (compiled_logits - eager_logits).abs().max().item(),
        "versions": _versions(),
    })
    return summary


def _versions() -> dict:
    import torch
    import transformers
    import triton

    # the modules' own strings: a local build's "+cu130" is in torch.__version__, not in its metadata
    return {"flagtree": flagtree_version, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _compile_facts(records: list[dict]) -> dict:
    """What flagtree did, summed over the graphs it compiled (one per Dynamo graph)."""
    compiled = [r for r in records if r.get("fallback") != "graph"]
    # operator.getitem only picks an output out of a tuple (attention's, say): no work, so not counted
    extern_ops = Counter(op for r in compiled for op in r.get("extern_ops", []) if op != "operator.getitem")
    work = sum(r.get("work_nodes", 0) for r in compiled)
    in_kernels = sum(r.get("work_nodes_in_kernels", 0) for r in compiled)
    first = compiled[0] if compiled else {}
    return {
        "target": first.get("target"),
        "target_vendor": first.get("target_vendor"),
        "target_reason": first.get("target_reason"),
        "executor": first.get("executor"),
        "graphs_compiled": len(compiled),
        "graph_fallbacks": [r.get("error", "") for r in records if r.get("fallback") == "graph"],
        "dynamic_symbols": sorted({s for r in compiled for s in r.get("dynamic_symbols", [])}),
        "triton_kernels": sum(r.get("triton_kernels", 0) for r in compiled),
        "kernel_failures": [f for r in compiled for f in r.get("kernel_failures", [])],
        "codegen_fallbacks": [f for r in compiled for f in r.get("codegen_fallbacks", [])],
        "work_nodes": work,
        "work_nodes_in_kernels": in_kernels,
        "lowered_fraction": round(in_kernels / work, 4) if work else None,
        "extern_ops": dict(extern_ops.most_common()),
        "flagtree_compile_s": round(sum(r.get("compile_s", 0.0) for r in records), 3),
        "module_paths": [r["module_path"] for r in compiled if "module_path" in r],
    }


def format_summary(summary: dict) -> str:
    s = summary
    lines = [f"flagtree demo: {s['preset']} ({s['model']}: {s['layers']} layers, hidden {s['hidden_size']}, "
             f"vocab {s['vocab_size']}), {s['dtype']} on {s['device']}"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<18}{text}")

    where = "Triton's interpreter on the CPU" if s["executor"] == "interpreter" else "Triton on the GPU"
    if s["target"]:
        row("target", f"{s['target']} ({s['target_reason']}); kernels run in {where}")
    else:
        row("target", "none: no graph was compiled")
    dynamic = f", dynamic sizes {', '.join(s['dynamic_symbols'])}" if s["dynamic_symbols"] else ""
    row("graphs", f"{s['graphs_compiled']} compiled{dynamic}")
    for problem in s["graph_fallbacks"]:
        row("", f"a graph fell back to eager aten: {problem}")
    row("kernels", f"{s['triton_kernels']} Triton kernels")
    if s["lowered_fraction"] is not None:
        row("in kernels", f"{s['work_nodes_in_kernels']} of {s['work_nodes']} non-GEMM/attention work nodes "
                          f"({100 * s['lowered_fraction']:.1f}%)")
    if s["kernel_failures"] or s["codegen_fallbacks"]:
        row("fallbacks", f"{len(s['kernel_failures'])} kernel runs failed and ran their aten fallback, "
                         f"{len(s['codegen_fallbacks'])} groups left to aten by codegen")
        for failure in s["kernel_failures"][:3]:
            row("", f"{failure['kernel']}: {failure['error']}")
    externs = ", ".join(f"{_short_op(op)} x{count}" for op, count in s["extern_ops"].items())
    row("extern ops", externs or "none")
    row("compile", f"{s['compile_s']:.2f} s for the first call (capture, passes, codegen, first run); "
                   f"flagtree's own share {s['flagtree_compile_s']:.2f} s")
    row("tokens/s", f"eager {s['eager_tokens_per_s']:g}, compiled {s['compiled_tokens_per_s']:g}")
    row("", s["timing_note"])
    total = s["new_tokens"]
    if s["tokens_agree"]:
        row("greedy tokens", f"compiled == eager, {total} of {total}: {s['compiled_tokens']}")
    else:
        row("greedy tokens", f"DIFFER from token {s['first_difference'] + 1} of {total}")
        row("", f"compiled {s['compiled_tokens']}")
        row("", f"eager    {s['eager_tokens']}")
        near_tie = s["eager_margin_at_difference"] <= 2 * s["max_abs_logit_diff"]
        row("", f"eager's logit for its token beat compiled's pick by {s['eager_margin_at_difference']:.3g}"
                + (" (a near tie: within the logit difference below)" if near_tie else ""))
    row("max |logit diff|", f"{s['max_abs_logit_diff']:.3g} (compiled vs eager on the same tokens)")
    return "\n".join(lines)


def _short_op(name: str) -> str:
    return name.removesuffix(".default")


def _generate(model, prompt, new_tokens: int, progress: Progress, task: str):
    """Greedy decoding one token at a time (for progress); returns (prompt + tokens, seconds)."""
    from flagtree_py.models import greedy_generate

    tokens = prompt
    start = time.perf_counter()
    for index in range(1, new_tokens + 1):
        tokens = greedy_generate(model, tokens, 1)
        progress.step(task, index, new_tokens)
    _synchronize(tokens.device.type)
    return tokens, time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
