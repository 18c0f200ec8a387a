"""`flagtree validate`: the consistency validation of the FlagOS model cards, compiled vs eager.

Runs the same prompts through eager PyTorch and through `torch.compile(model, backend="flagtree")` and
reports: the logit error on every position (absolute, and relative to the eager logits' scale), top-1
agreement over all positions, whether greedy continuations are identical (or the first position where
they differ), and the kernel furthest from its aten twin (option check_kernels: kernel launches are
recomputed with aten), which is where to look when the model disagrees. Next to plain top-1 agreement, two
margin-aware figures (cli/agreement.py) separate near-tied logits from compiler error: agreement of eager and
of the compiled model with a float32 eager reference, and agreement over the positions whose reference
top-1 margin exceeds a bound.

Each continuation's last step runs the model on the whole scored sequence (the prompt and every generated
token but the last), so its logits are the ones scored: no extra pass, unless the continuations differ.
Kernels are checked in full on each prompt's first and last step, and on the steps between them where a
kernel meets a launch grid it has not been checked with (runtime/check.py: checking_new_grids_only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

from flagtree_py.cli.agreement import DEFAULT_BOUND, AgreementTally, format_margin_aware
from flagtree_py.cli.common import Progress, error, format_table, fraction, non_negative_float, positive_int
from flagtree_py.cli.demo import _compile_facts, _target_name, _versions

DTYPES = ("float32", "bfloat16", "float16")

#: prompts used when --prompts is not given: plain, different in length. Short on purpose: without a KV
#: cache every greedy step reruns the whole sequence, and on the CPU kernels run in Triton's interpreter; a
#: prompt under 16 tokens also takes the small-M GEMM (split-K) and flash-decoding paths at its first steps.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def f(n):",
)

#: --max-kernel-error default per dtype: a kernel's max |kernel - aten| over the launch's max |aten value|.
#: float32 kernels and aten differ by summation order only (~1e-6); 16-bit kernels keep float32
#: intermediates where aten rounds after every op, a few units in the last place (bf16: 2**-8 = 0.4%).
KERNEL_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="compare a model compiled by flagtree with eager PyTorch on the same prompts",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " "),
        epilog="Prompts are encoded with the model directory's tokenizer when it has one; otherwise (and for "
        "--tiny presets, which have no tokenizer) each UTF-8 byte of a prompt is one token id (modulo the "
        "vocabulary size), deterministically. Margin-aware figures (reported, never judged): 'vs float32' is the "
        "top-1 agreement of eager and of the compiled model with eager run in float32 on the same sequences (the "
        "model itself when --dtype is float32): a compiler as correct as eager agrees with float32 as often as eager "
        "does; 'clear margins' is compiled-vs-eager top-1 agreement over the positions whose float32 top-1 margin "
        "(top-1 minus top-2 logit) exceeds --min-margin, where no rounding can flip the choice, so anything below "
        "100% there is a defect. exit status: 0 agreement at or above --min-top1 and every kernel within "
        "--max-kernel-error, 1 not (or a graph was not compiled by flagtree), 2 bad input",
    )
    parser.add_argument("model", help="a preset name (see `flagtree demo --preset`) or a Hugging Face model "
                        "directory with weights (config.json, *.safetensors)")
    parser.add_argument("--tiny", action="store_true",
                        help="build the preset's tiny random-weight configuration (CPU-sized); without it a preset "
                        "is built at its real shapes with random weights, which needs a CUDA GPU")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="keep only the first N decoder layers (presets only; real shapes are large)")
    parser.add_argument("--target", type=_target_name, default="auto",
                        help="auto (from the device; the default), interpreter, nvidia, metax, iluvatar, or a name "
                        "from `flagtree targets`")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a UTF-8 text file, one prompt per non-empty line (default: two built-in prompts)")
    parser.add_argument("--tokens", type=positive_int, default=64,
                        help="greedy tokens to generate per prompt (default: 64)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and activations (default: float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--min-top1", type=fraction, default=0.999,
                        help="exit 1 when top-1 agreement over all positions is below this (0..1; default 0.999); "
                        "plain agreement, compiled vs eager in --dtype")
    parser.add_argument("--min-margin", type=non_negative_float, default=None,
                        help="the 'clear margins' figure keeps positions whose float32 reference top-1 margin exceeds "
                        f"this many logits (default: {DEFAULT_BOUND}; 0 for a float32 model)")
    parser.add_argument("--max-kernel-error", type=non_negative_float, default=None,
                        help="exit 1 when a kernel's error relative to its aten twin exceeds this (default by "
                        "dtype: " + ", ".join(f"{k} {v:g}" for k, v in KERNEL_TOLERANCE.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run, prog=parser.prog)


def run(args: argparse.Namespace) -> int:
    import torch

    from flagtree_py.models import PRESETS, UnknownPresetError, get_preset
    from flagtree_py.targets import get_target

    interpreted = args.target != "auto" and get_target(args.target).vendor == "interpreter"
    device = "cuda" if torch.cuda.is_available() and not interpreted else "cpu"
    is_directory = os.path.isdir(args.model)
    if not is_directory:
        if args.model not in PRESETS and (os.sep in args.model or args.model.startswith(".")):
            return error(args.prog, f"no such model directory: {args.model}")
        try:
            get_preset(args.model)
        except UnknownPresetError as problem:
            return error(args.prog, f"{problem} (or give a model directory)")
    if is_directory and (args.tiny or args.layers):
        return error(args.prog, "--tiny and --layers apply to presets, not to a model directory")
    if is_directory and not (Path(args.model) / "config.json").is_file():
        return error(args.prog, f"{args.model} has no config.json: not a Hugging Face model directory")
    if not is_directory and not args.tiny and device == "cpu":
        return error(args.prog, f"preset {args.model!r} at its real shapes needs a CUDA GPU; pass --tiny for the "
                                "CPU-sized model")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype == "bfloat16" and device == "cpu":
        return error(args.prog, "--dtype bfloat16 needs a CUDA GPU (Triton's interpreter mishandles bfloat16 on "
                                "the CPU); use float32 or float16")
    try:
        prompts = read_prompts(args.prompts)
    except ValueError as problem:
        return error(args.prog, str(problem))

    progress = Progress(args.prog)
    model, tokenizer, description = load_model(args.model, is_directory, args.tiny, args.layers, dtype, device,
                                               args.seed, progress)
    tolerance = args.max_kernel_error if args.max_kernel_error is not None else KERNEL_TOLERANCE[dtype]
    summary = validate_model(model, tokenizer, prompts, args.tokens, args.target, device, progress, args.min_margin)
    summary = {**description, "dtype": dtype, "device": device, "requested_target": args.target, **summary}
    judge(summary, args.min_top1, tolerance)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary["passed"] else 1


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as problem:
        raise ValueError(f"cannot read --prompts {path}: {problem.strerror or problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} has no prompt (one per non-empty line)")
    return prompts


class ByteTokenizer:
    """No tokenizer at hand: each UTF-8 byte is one token id, modulo the vocabulary (deterministic)."""

    name = "UTF-8 bytes (no tokenizer)"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [byte % self.vocab_size for byte in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, tokenizer, directory: str) -> None:
        self.tokenizer = tokenizer
        self.name = f"{type(tokenizer).__name__} from {directory}"

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_model(name: str, is_directory: bool, tiny: bool, layers: int | None, dtype_name: str, device: str,
               seed: int, progress: Progress):
    """(model with forward(input_ids) -> logits, tokenizer, description fields)."""
    import torch

    from flagtree_py.models import build_model, get_preset, real_config, tiny_config

    dtype = getattr(torch, dtype_name)
    if is_directory:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from flagtree_py.models.configs import ATTN_IMPLEMENTATION, EXPERTS_IMPLEMENTATION
        from flagtree_py.models.tiny import CausalLMLogits

        progress.note(f"loading {name} ({dtype_name}, {device})")
        causal_lm = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
            experts_implementation=EXPERTS_IMPLEMENTATION)
        model = CausalLMLogits(causal_lm).to(device).eval().requires_grad_(False)
        try:
            tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(name), name)
        except (OSError, ValueError, TypeError):  # no tokenizer files in the directory
            tokenizer = ByteTokenizer(causal_lm.config.vocab_size)
        config = causal_lm.config
        description = {"model": str(Path(name).resolve()), "source": "model directory (its weights)",
                       "architecture": type(causal_lm).__name__}
    else:
        preset = get_preset(name)
        config = tiny_config(name) if tiny else real_config(name)
        shape = "tiny" if tiny else "real-shape"
        progress.note(f"building the {shape} {preset.name} model with random weights ({dtype_name}, {device})")
        model = build_model(config, dtype=dtype, device=device, num_layers=layers, seed=seed)
        config = getattr(model, "config", config)
        tokenizer = ByteTokenizer(config.vocab_size)
        description = {"model": preset.name, "source": f"preset {preset.hf_id}, {shape}, random weights (seed {seed})",
                       "architecture": preset.architecture}
    description["layers"] = config.num_hidden_layers
    description["vocab_size"] = config.vocab_size
    description["tokenizer"] = tokenizer.name
    return model, tokenizer, description


def validate_model(model, tokenizer, prompts: list[str], new_tokens: int, target: str, device: str,
                   progress: Progress, min_margin: float | None = None) -> dict:
    """Compile with check_kernels on, then compare eager and compiled on every prompt (what --json shows)."""
    import torch

    import flagtree_py

    first_record = len(flagtree_py.report())
    compiled = torch.compile(model, backend="flagtree", dynamic=True,
                             options={"target": target, "check_kernels": True})
    results, errors, eager_magnitudes, agree, positions, scored = [], [], [], 0, 0, []
    start = time.perf_counter()
    for number, text in enumerate(prompts, 1):
        ids = tokenizer.encode(text)
        if not ids:
            ids = [0]
        prompt = torch.tensor([ids], device=device)
        progress.note(f"prompt {number}/{len(prompts)}: {len(ids)} tokens, greedy {new_tokens} tokens, eager")
        eager_tokens, eager_logits = greedy_continuation(model, prompt, new_tokens)
        progress.note(f"prompt {number}/{len(prompts)}: flagtree")
        compiled_tokens, compiled_logits = greedy_continuation(compiled, prompt, new_tokens)
        # both models on eager's whole sequence: every position is scored against the same prefix. Each last
        # step ran on its own sequence minus the last token, eager's too when the continuations are identical.
        sequence = eager_tokens[:, :-1].clone(memory_format=torch.contiguous_format)
        if not torch.equal(compiled_tokens, eager_tokens):
            with torch.no_grad():
                compiled_logits = compiled(sequence)
        scored.append((sequence, eager_logits, compiled_logits))
        eager_logits, compiled_logits = eager_logits.double(), compiled_logits.double()
        difference = (compiled_logits - eager_logits).abs()
        errors.append(difference.flatten())
        eager_magnitudes.append(eager_logits.abs().flatten())
        top1 = compiled_logits.argmax(-1) == eager_logits.argmax(-1)
        agree += int(top1.sum().item())
        positions += top1.numel()
        eager_new = eager_tokens[0, len(ids):].tolist()
        compiled_new = compiled_tokens[0, len(ids):].tolist()
        first_difference = next((i for i, (c, e) in enumerate(zip(compiled_new, eager_new)) if c != e), None)
        results.append({
            "prompt": text, "prompt_tokens": len(ids), "positions": top1.numel(),
            "top1_agreement": top1.float().mean().item(),
            "max_abs_logit_error": difference.max().item(),
            "greedy_identical": first_difference is None, "first_difference": first_difference,
            "eager_continuation": eager_new, "compiled_continuation": compiled_new,
            "eager_text": tokenizer.decode(eager_new),
        })
    margin_aware = score_against_float32(model, scored, progress).summary(min_margin)
    elapsed = time.perf_counter() - start
    error_values, magnitudes = torch.cat(errors), torch.cat(eager_magnitudes)
    records = flagtree_py.report()[first_record:]
    max_abs, mean_abs = error_values.max().item(), error_values.mean().item()
    scale_max, scale_mean = magnitudes.max().item(), magnitudes.mean().item()
    summary = {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "positions": positions,
        "top1_agreement": agree / positions,
        "top1_mismatches": positions - agree,
        "greedy_identical": sum(r["greedy_identical"] for r in results),
        "max_abs_logit_error": max_abs,
        "mean_abs_logit_error": mean_abs,
        # relative to the logits' scale: max error over max |eager logit|, mean error over mean |eager logit|
        "max_rel_logit_error": max_abs / scale_max if scale_max else 0.0,
        "mean_rel_logit_error": mean_abs / scale_mean if scale_mean else 0.0,
        "logit_scale": {"max_abs": scale_max, "mean_abs": scale_mean},
        "margin_aware": margin_aware,
        "kernels": kernel_errors(records),
        "seconds": round(elapsed, 2),
        "results": results,
    }
    facts = _compile_facts(records)
    summary.update({key: facts[key] for key in ("target", "target_reason", "executor", "graphs_compiled",
                                                "graph_fallbacks", "triton_kernels", "kernel_failures")})
    summary["versions"] = _versions()
    return summary


def greedy_continuation(model, prompt, new_tokens: int):
    """(prompt + `new_tokens` greedy ids, the last step's logits [1, len - 1, vocab]): no KV cache, each step
    runs the whole sequence so far. Kernel checks in full on the first step (the prompt) and the last (the
    scored sequence), in between only on launch grids new to a kernel (a no-op for eager)."""
    import torch

    from flagtree_py.runtime.check import checking_new_grids_only

    tokens = prompt.clone()  # a fresh tensor, not a view: Dynamo guards on a view's base (one recompile)
    logits = None
    with torch.no_grad():
        for step in range(new_tokens):
            between = 0 < step < new_tokens - 1
            with checking_new_grids_only() if between else contextlib.nullcontext():
                logits = model(tokens)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True).to(tokens.dtype)], dim=1)
    return tokens, logits.clone()  # not a buffer a later call may reuse (CUDA graphs' static outputs)


def score_against_float32(model, scored: list, progress: Progress) -> AgreementTally:
    """The margin-aware tally: eager and compiled logits of each scored sequence against eager float32 logits.
    A 16-bit model is converted to float32 in place for this (after every compiled run: the compiled model
    is not called again), which is exact: every 16-bit value is a float32 value."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        tally = AgreementTally("eager (the float32 model itself)")
        for _, eager, compiled in scored:
            tally.add(eager, compiled, eager)
        return tally
    progress.note("float32 reference: eager in float32 on the scored sequences")
    model.float()
    tally = AgreementTally("eager in float32 (the same weights)")
    with torch.no_grad():
        for sequence, eager, compiled in scored:
            tally.add(eager, compiled, model(sequence))
    return tally


def kernel_errors(records: list[dict]) -> dict:
    """Every checked kernel of every graph, worst first (by error relative to the aten values' scale)."""
    rows = []
    for record in records:
        nodes = {k["name"]: k["nodes"] for k in record.get("kernels", [])}
        for name, entry in record.get("kernel_errors", {}).items():
            rows.append({"graph": record["graph"], "kernel": name, **entry, "nodes": nodes.get(name, [])})
    rows.sort(key=lambda row: (-row["max_rel_error"], -row["max_abs_error"], row["graph"], row["kernel"]))
    return {"checked": len(rows), "launches_checked": sum(r["launches"] for r in rows),
            "worst": rows[0] if rows else None, "all": rows}


def judge(summary: dict, min_top1: float, kernel_tolerance: float) -> None:
    """Fill summary["passed"] and the reasons it failed."""
    failures = []
    if summary["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {summary['top1_agreement']:.4%} is below --min-top1 {min_top1:.4%}")
    worst = summary["kernels"]["worst"]
    if worst is not None and not worst["max_rel_error"] <= kernel_tolerance:
        failures.append(f"kernel {worst['kernel']} ({worst['graph']}) differs from aten by "
                        f"{worst['max_rel_error']:.3g} of its values' scale, above --max-kernel-error {kernel_tolerance:g}")
    for problem in summary["graph_fallbacks"]:
        failures.append(f"a graph was not compiled by flagtree (ran in eager aten): {problem}")
    if summary["graphs_compiled"] == 0 and not summary["graph_fallbacks"]:
        failures.append("flagtree compiled no graph")
    summary["thresholds"] = {"min_top1": min_top1, "max_kernel_error": kernel_tolerance}
    summary["failures"] = failures
    summary["passed"] = not failures


def format_summary(summary: dict) -> str:
    s = summary
    lines = [(f"flagtree validate: {s['model']} ({s['source']}; {s['architecture']}, {s['layers']} layers, "
             f"vocab {s['vocab_size']}), {s['dtype']} on {s['device']}"),
             (f"  target {s['target']} ({s['target_reason']}); {s['graphs_compiled']} graph(s), "
             f"{s['triton_kernels']} Triton kernels; prompts encoded with {s['tokenizer']}"), ""]
    rows = []
    for number, r in enumerate(s["results"], 1):
        greedy = "identical" if r["greedy_identical"] else f"differ at token {r['first_difference'] + 1}"
        rows.append([number, r["prompt_tokens"], r["positions"], f"{r['top1_agreement']:.2%}",
                     f"{r['max_abs_logit_error']:.3g}", f"{greedy} ({s['new_tokens']} tokens)", _clip(r["prompt"])])
    lines.append(format_table(["#", "tokens", "positions", "top-1", "max |err|", "greedy", "prompt"], rows))
    lines.append("")
    worst = s["kernels"]["worst"]
    total = [
        ("top-1 agreement", (f"{s['top1_agreement']:.4%} over {s['positions']} positions "
                            f"({s['top1_mismatches']} differ); minimum {s['thresholds']['min_top1']:.4%}")),
        ("logit error", (f"max {s['max_abs_logit_error']:.3g} ({s['max_rel_logit_error']:.3g} of max |logit|), "
                        f"mean {s['mean_abs_logit_error']:.3g} ({s['mean_rel_logit_error']:.3g} of mean |logit|)")),
        ("greedy", f"{s['greedy_identical']} of {s['prompts']} continuations identical for {s['new_tokens']} tokens"),
        *format_margin_aware(s["margin_aware"]),
    ]
    if worst is None:
        total.append(("worst kernel", "no kernel was checked"))
    else:
        total.append(("worst kernel", (f"{worst['kernel']} in {worst['graph']}: max error {worst['max_rel_error']:.3g} "
                                      f"of its values' scale ({worst['max_abs_error']:.3g} absolute) over "
                                      f"{worst['launches']} launches; limit {s['thresholds']['max_kernel_error']:g}")))
        total.append(("", f"computes {', '.join(worst['nodes'][:12])}{' ...' if len(worst['nodes']) > 12 else ''}"))
        total.append(("", (f"{s['kernels']['checked']} kernels, {s['kernels']['launches_checked']} launches checked "
                          f"against aten")))
    lines += [f"  {label:<17}{text}" for label, text in total]
    lines.append("")
    lines.append("PASSED" if s["passed"] else "FAILED: " + "; ".join(s["failures"]))
    return "\n".join(lines)


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
