"""Whole-model decode benchmark (issue 9): eager vs Inductor vs flagtree, generating with a static KV cache.

One model per run (`--model`), real shapes, random bf16 weights, transformers' model with its StaticCache,
batch 1 and 32, a context already in the cache (`--context`, default 1024). For every mode:

- ms per decode step (one token per sequence), timed over `--tokens` greedy steps after warm-up;
- % of the HBM roofline: floor = bytes a step must read (weights it touches + the context's KV) over the
  copy bandwidth measured in the same run (read + write bytes of a large device copy per second);
- first-call seconds per batch size (Dynamo + backend compile + first run): flagtree's cold figure runs with
  an empty flagtree cache, its warm figure in a second process that finds the cache filled; then, at the
  first batch size, a third process precompiles the step (torch's `aot_compile` through
  `flagtree_py.precompile.precompiled`, saved to a file) and a fourth loads it: its first call is the load
  and the first step, with no Dynamo trace (`flagtree-precompile`, `flagtree-precompiled`);
- flagtree only: Dynamo recompiles across prompt lengths 1..4096 (prefill at `--lengths`, on a model of the
  same shapes with `--recompile-layers` layers), and top-1 agreement with eager over >= 1,000 positions
  (batch 32, `--agreement-steps` decode steps with the same tokens fed to both; each keeps its own cache).

Each mode runs in its own subprocess, so that a crash (or a poisoned CUDA context) loses that mode only; a
mode that would start after `--budget-s` (default 540 s) is skipped and recorded as skipped. Modes run in
the order eager, flagtree, flagtree-warm, flagtree-precompile, flagtree-precompiled, reduce-overhead,
max-autotune. Compiler caches (flagtree's,
Triton's, Inductor's) start empty in every run. One model per run; JSON to --out, a PNG chart beside it.

    python benchmarks/decode.py --model qwen3 --modes eager,flagtree --out decode_qwen3_flagtree.json
    python benchmarks/decode.py --model qwen3 --modes eager,reduce-overhead --out decode_qwen3_inductor.json
    python benchmarks/decode.py --model qwen3-30b-a3b --out decode_qwen3moe.json     # 24 layers by default
    python benchmarks/decode.py --smoke --out /tmp/decode_smoke.json   # tiny shapes on the CPU (tests the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("eager", "reduce-overhead", "max-autotune", "flagtree")
#: Qwen3-30B-A3B: 48 layers of 61 GB in bf16 do not leave room for batch 32's cache and the compilers'
#: workspaces on an 80 GB H100, and its compile times scale with layers: 24 layers by default (recorded)
DEFAULT_LAYERS = {"qwen3": None, "qwen3-30b-a3b": 24}
#: second processes of the flagtree mode (first batch size only): see the module docstring
FLAGTREE_LATER = ("flagtree-warm", "flagtree-precompile", "flagtree-precompiled")
DEFAULT_LENGTHS = (1, 2, 3, 5, 8, 17, 64, 100, 255, 512, 1000, 2048, 3000, 4096)
SMOKE_LENGTHS = (1, 2, 3, 5, 8, 17, 33)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(DEFAULT_LAYERS), default="qwen3")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all for qwen3, 24 for MoE)")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--context", type=int, default=1024, help="tokens already in the cache (default 1024)")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps per batch size (default 32)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first call (default 3)")
    parser.add_argument("--modes", default="eager,reduce-overhead,flagtree", help=f"of {','.join(MODES)}")
    parser.add_argument("--max-autotune", action="store_true", help="add Inductor mode=max-autotune (slow compile)")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="prefill lengths of the recompile count (flagtree)")
    parser.add_argument("--recompiles-only", action="store_true",
                        help="flagtree: only the recompile count over --lengths (no batch timing, no warm process)")
    parser.add_argument("--recompile-layers", type=int, default=2,
                        help="layers of the model the recompile count compiles (default 2; same shapes otherwise)")
    parser.add_argument("--agreement-steps", type=int, default=32,
                        help="decode steps at the largest batch compared with eager (default 32: 32x32 = 1024)")
    parser.add_argument("--experts", default="grouped_mm",
                        help="transformers experts implementation of MoE models (default grouped_mm: batched_mm "
                        "gathers every token's expert weights, tens of GB at prefill lengths of thousands)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip modes that would start later (default 540)")
    parser.add_argument("--mode-timeout-s", type=float, default=420.0, help="one mode's subprocess limit")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the model's dtype on the GPU (float32: agreement free of bf16 rounding; the float32 "
                             "reference is then the model itself)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, float32, on the CPU (Triton's interpreter)")
    parser.add_argument("--out", required=True, help="JSON path; the chart goes beside it (.png)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one mode, write JSON
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.context, args.tokens, args.warmup = min(args.context, 12), min(args.tokens, 4), min(args.warmup, 1)
        args.agreement_steps = min(args.agreement_steps, 4)
        args.recompile_layers = 1
        if args.batch == "1,32":
            args.batch = "1,2"
        if args.lengths == ",".join(map(str, DEFAULT_LENGTHS)):
            args.lengths = ",".join(map(str, SMOKE_LENGTHS))
    if args.layers is None:
        args.layers = 2 if args.smoke else DEFAULT_LAYERS[args.model]
    args.batches = [int(b) for b in args.batch.split(",")]
    args.length_list = [int(n) for n in args.lengths.split(",")]
    args.mode_list = [m for m in args.modes.split(",") if m] + (["max-autotune"] if args.max_autotune else [])
    unknown = sorted(set(args.mode_list) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    return args


# -- the model and one decode step --------------------------------------------------------------------------


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    return ("cpu", torch.float32) if args.smoke else ("cuda", getattr(torch, args.dtype))


def build(args, layers: int | None = None):
    """The HF causal LM (not our logits wrapper: the static cache needs its full forward)."""
    from flagtree_py.models import build_model, real_config, tiny_config

    device, dtype = device_and_dtype(args)
    config = tiny_config(args.model) if args.smoke else real_config(args.model)
    experts = args.experts if hasattr(config, "num_experts") and not args.smoke else "batched_mm"
    model = build_model(config, dtype=dtype, device=device, num_layers=layers or args.layers, seed=0,
                        experts_implementation=experts)
    return model.causal_lm, experts


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Decoder:
    """A static cache of `batch` x `max_len` and `step(ids, positions) -> logits` through one callable."""

    def __init__(self, lm, batch: int, max_len: int, device: str) -> None:
        from transformers import StaticCache

        self.lm, self.device, self.batch, self.max_len = lm, device, batch, max_len
        self.cache = StaticCache(config=lm.config, max_cache_len=max_len)
        # allocate the cache outside any compiled region (transformers would otherwise do it lazily, mid-graph)
        config = lm.config
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        if hasattr(self.cache, "early_initialization"):
            self.cache.early_initialization(batch, config.num_key_value_heads, head_dim, lm.dtype, torch.device(device))
        else:  # older transformers: one eager token allocates it
            self.prefill(torch.zeros(batch, 1, dtype=torch.long, device=device))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True).logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Eager prefill: fills the cache with a context (its content does not change a step's cost)."""
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        with torch.no_grad():
            return self.forward(ids, positions)


def compile_for(mode: str, fn, args, cuda_graphs: bool = True):
    """`cuda_graphs`: flagtree replays decode steps from CUDA graphs on the GPU (not for the prefill
    lengths of the recompile count, where every length would be a captured bucket)."""
    if mode == "eager":
        return fn
    if mode == "flagtree":
        target = "interpreter" if args.smoke else "auto"
        graphs = cuda_graphs and not args.smoke
        return torch.compile(fn, backend="flagtree", options={"target": target, "cuda_graphs": graphs})
    return torch.compile(fn, mode=mode)


def precompiled_step(args, decoder: Decoder, first: torch.Tensor, entry: dict):
    """flagtree-precompile: precompile the step and save it (Dynamo traces, flagtree's cache is warm);
    flagtree-precompiled: load what that saved, with no Dynamo trace. `entry` gets the seconds each took."""
    from flagtree_py.precompile import precompiled

    path = os.environ["DECODE_PRECOMPILED"]
    if args.worker == "flagtree-precompiled" and not Path(path).is_file():
        raise RuntimeError(f"no precompiled step at {path}: the flagtree-precompile process saved none")
    target = "interpreter" if args.smoke else "auto"
    started = time.perf_counter()
    positions = torch.full((decoder.batch, 1), args.context, device=decoder.device)
    step = precompiled(decoder.forward, (first, positions), path,
                       options={"target": target, "cuda_graphs": not args.smoke})
    entry["precompiled_source"] = step.source
    entry["load_s" if step.source == "loaded" else "precompile_s"] = round(time.perf_counter() - started, 3)
    if args.worker == "flagtree-precompiled" and step.source != "loaded":
        raise RuntimeError(f"{path} was not loaded: the step was precompiled again (see the warnings)")
    return step


def run_steps(step, decoder: Decoder, first: torch.Tensor, start: int, count: int, cudagraphs: bool):
    """`count` greedy decode steps from position `start`; returns the last tokens (device tensor)."""
    tokens = first
    # a fresh contiguous tensor per step, made before the loop: Dynamo guards on strides and views' bases
    positions = [torch.full((decoder.batch, 1), start + i, device=decoder.device) for i in range(count)]
    for i in range(count):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(tokens, positions[i])
        tokens = logits[:, -1].argmax(-1, keepdim=True)
    return tokens


# -- one mode in its own process -----------------------------------------------------------------------------


def worker(args) -> dict:
    import flagtree_py

    device, _ = device_and_dtype(args)
    mode = "flagtree" if args.worker in FLAGTREE_LATER else args.worker
    result: dict = {"mode": args.worker, "batches": {}}
    if args.recompiles_only and mode == "flagtree":  # the recompile count builds its own few-layer model
        result["recompiles"] = _guarded(recompiles, args, device)
        return result
    start = time.perf_counter()
    lm, result["experts_implementation"] = build(args)
    result["build_s"] = round(time.perf_counter() - start, 2)
    vocab = lm.config.vocab_size
    batches = args.batches[:1] if args.worker in FLAGTREE_LATER else args.batches
    cudagraphs = mode in ("reduce-overhead", "max-autotune")
    for batch in batches:
        torch._dynamo.reset()
        entry: dict = {}
        graphs_before = _dynamo_graphs()
        try:
            steps = max(args.warmup + args.tokens + 1, args.agreement_steps)
            decoder = Decoder(lm, batch, args.context + steps + 1, device)
            context = torch.randint(0, vocab, (batch, args.context), device=device)
            first = decoder.prefill(context)[:, -1].argmax(-1, keepdim=True)
            with torch.no_grad():
                t0 = time.perf_counter()
                if args.worker in ("flagtree-precompile", "flagtree-precompiled"):
                    step = precompiled_step(args, decoder, first, entry)
                else:
                    step = compile_for(mode, decoder.forward, args)
                tokens = run_steps(step, decoder, first, args.context, 1, cudagraphs)
                synchronize(device)
                entry["first_call_s"] = round(time.perf_counter() - t0, 3)
                if mode == "flagtree" and batch == batches[0]:  # the process's first compile: where it went
                    entry["first_call_parts"] = _first_call_parts(entry["first_call_s"], flagtree_py.report())
                tokens = run_steps(step, decoder, tokens, args.context + 1, args.warmup, cudagraphs)
                synchronize(device)
                t0 = time.perf_counter()
                run_steps(step, decoder, tokens, args.context + 1 + args.warmup, args.tokens, cudagraphs)
                synchronize(device)
            elapsed = time.perf_counter() - t0
            entry["ms_per_step"] = round(1000 * elapsed / args.tokens, 3)
            entry["tokens_per_s"] = round(batch * args.tokens / elapsed, 1)
            entry["dynamo_graphs"] = _dynamo_graphs() - graphs_before
            entry["cudagraph_skips"] = _cudagraph_skips()
            if hasattr(step, "fallback_calls"):  # calls the precompiled guards refused: 0 expected
                entry["fallback_calls"] = step.fallback_calls
            if args.worker in ("flagtree", "reduce-overhead") and batch == max(args.batches):
                # Inductor's agreement too: with random weights near-tied logits make the figure a
                # property of bf16 rounding as much as of the compiler; Inductor's is the baseline
                result["agreement"] = _guarded(agreement, lm, args, device, decoder, step, cudagraphs)
        except Exception as error:  # noqa: BLE001 -- one batch size failing must not lose the others
            entry["error"] = f"{type(error).__name__}: {error}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
        result["batches"][str(batch)] = entry
        if mode == "flagtree":
            entry["flagtree"] = _flagtree_summary(flagtree_py.report())
            flagtree_py.clear_report()
        decoder = step = None  # free this batch's cache before the next one
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.worker == "flagtree":
        torch._dynamo.reset()
        lm = None
        if device == "cuda":
            torch.cuda.empty_cache()
        result["recompiles"] = _guarded(recompiles, args, device)
    return result


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 -- recorded; the other measurements still count
        return {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def _first_call_parts(first_call_s: float, records: list[dict]) -> dict:
    """Seconds of the first call by part: Dynamo's trace (`compile_inner` less the backend it calls), the
    backend (AOTAutograd and flagtree: `phases_s`), and the rest (the first run: the kernels built in parallel
    before it (`parallel_builds`, runtime/parallel_builds.py), Triton's JIT building any kernel left at its first
    launch, CUDA graph capture). A precompiled load traces nothing: no Dynamo part."""
    from torch._dynamo.utils import compile_times

    times = {k: float(v) for k, v in zip(*compile_times(repr="csv", aggregate=True))}
    # a precompile's trace is timed as `fullgraph_capture` (torch/_dynamo/aot_compile.py), with the backend in it
    inner = times.get("_compile.compile_inner", 0.0) or times.get("fullgraph_capture", 0.0)
    backend = times.get("OutputGraph.call_user_compiler", 0.0)
    phases: dict = {}
    for record in records:
        for name, seconds in record.get("phases_s", {}).items():
            phases[name] = round(phases.get(name, 0.0) + seconds, 3)
    return {"dynamo_trace": round(inner - backend, 3), "backend": round(backend, 3), "flagtree_phases": phases,
            "first_run": round(first_call_s - inner, 3), "cache_path": [r.get("cache_path") for r in records],
            "triton_compiles": sum(_kernel_compiles().values()),
            "parallel_builds": [r.get("parallel_builds") for r in records]}


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _flagtree_summary(records: list[dict]) -> dict:
    return {
        "graphs": len(records),
        "cache": [r.get("cache") for r in records],
        "graph_fallbacks": [r.get("error") for r in records if r.get("fallback") == "graph"],
        "triton_kernels": sum(r.get("triton_kernels", 0) for r in records),
        "kernel_failures": [f for r in records for f in r.get("kernel_failures", [])][:5],
        "extern_ops": sorted({op for r in records for op in r.get("extern_ops", [])}),
        "flagtree_compile_s": round(sum(r.get("compile_s", 0.0) for r in records), 3),
        "cuda_graphs": [r.get("cuda_graphs") for r in records],
        "cuda_graph_counts": [dict(r.get("cuda_graph_counts", {})) for r in records],
        "cuda_graph_skips": [r.get("cuda_graph_skips") for r in records if r.get("cuda_graph_skips")],
    }


def agreement(lm, args, device: str, compiled: Decoder, step, cudagraphs: bool = False) -> dict:
    """Top-1 of flagtree vs eager at the largest batch, on the same input tokens (eager's greedy choice),
    each model with its own cache: batch x steps decode positions. Reuses the timed batch's compiled step
    (and so its cache: a new cache object would make Dynamo compile again).

    Next to it, `margin_aware` (flagtree_py/cli/agreement.py, as in `flagtree validate`): eager and the compiled
    step both scored against eager in float32 on the same tokens, and agreement over the positions whose float32
    top-1 margin exceeds twice eager's own logit error (where rounding cannot flip the choice)."""
    batch, steps = compiled.batch, args.agreement_steps
    eager = Decoder(lm, batch, compiled.max_len, device)
    graphs_before = _dynamo_graphs()
    context = torch.randint(0, lm.config.vocab_size, (batch, args.context), device=device)
    tokens = eager.prefill(context)[:, -1].argmax(-1, keepdim=True)
    compiled.prefill(context)
    agree, positions, worst, scale, margins = 0, 0, 0.0, 0.0, []
    fed, eager_logits, compiled_logits = [], [], []  # per step, in the model's dtype, for the float32 reference
    with torch.no_grad():
        for i in range(steps):
            position = torch.full((batch, 1), args.context + i, device=device)
            want = eager.forward(tokens, position)[:, -1]
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            got = step(tokens, position)[:, -1].clone()  # a CUDA graph's output is overwritten by its next replay
            fed.append(tokens)
            eager_logits.append(want)
            compiled_logits.append(got)
            want, got = want.float(), got.float()
            top2 = want.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).cpu())
            agree += int((want.argmax(-1) == got.argmax(-1)).sum().item())
            positions += batch
            worst = max(worst, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
            tokens = want.argmax(-1, keepdim=True)
    graphs = _dynamo_graphs() - graphs_before
    eager = None  # its cache's memory goes to the float32 reference's
    return {"batch": batch, "steps": steps, "positions": positions, "top1_agreement": agree / positions,
            "max_abs_logit_error": worst, "max_rel_logit_error": worst / scale if scale else 0.0,
            "dynamo_graphs_compiled": graphs,
            # eager's top-1 minus top-2 logit per position: how close to a tie random weights leave it
            "eager_top1_margin_quantiles": _quantiles(torch.cat(margins)) if margins else {},
            "margin_aware": _guarded(margin_aware, lm, args, device, context, fed, eager_logits, compiled_logits)}


#: rows of the batch run at once by the float32 reference (its cache and weights take twice bf16's memory)
REFERENCE_ROWS = 8


def margin_aware(lm, args, device: str, context, fed: list, eager_logits: list, compiled_logits: list) -> dict:
    """Eager float32 on the agreement's tokens, a few rows of the batch at a time; `lm` is converted to float32
    in place and back (exact: bf16 values are float32 values). Called after the compiled step's last use."""
    from flagtree_py.cli.agreement import AgreementTally

    eager, compiled = torch.stack(eager_logits, 1), torch.stack(compiled_logits, 1)  # [batch, steps, vocab]
    dtype = lm.dtype
    if dtype == torch.float32:
        tally = AgreementTally("eager (the float32 model itself)")
        tally.add(eager, compiled, eager)
        return tally.summary()
    tally = AgreementTally("eager in float32 (the same weights)")
    tokens = torch.cat(fed, 1)  # [batch, steps]: what both models were fed
    lm.float()
    try:
        with torch.no_grad():
            for first in range(0, context.shape[0], REFERENCE_ROWS):
                rows = slice(first, first + REFERENCE_ROWS)
                reference = Decoder(lm, context[rows].shape[0], context.shape[1] + tokens.shape[1] + 1, device)
                positions = torch.arange(context.shape[1], device=device).expand(context[rows].shape[0], -1)
                reference.cache.reset()
                lm(input_ids=context[rows], position_ids=positions, past_key_values=reference.cache, use_cache=True,
                   logits_to_keep=1)  # the prefill's logits are not scored: only the last one is computed
                logits = []
                for i in range(tokens.shape[1]):
                    position = torch.full((context[rows].shape[0], 1), context.shape[1] + i, device=device)
                    logits.append(reference.forward(tokens[rows, i:i + 1], position)[:, -1])
                tally.add(eager[rows], compiled[rows], torch.stack(logits, 1))
                reference = logits = None
    finally:
        lm.to(dtype)
    return tally.summary()


def _quantiles(values: torch.Tensor) -> dict:
    qs = (0.01, 0.1, 0.5, 0.9)
    found = torch.quantile(values.float(), torch.tensor(qs))
    return {str(q): round(float(v), 5) for q, v in zip(qs, found)}


def recompiles(args, device: str) -> dict:
    """Prefill (compiled by flagtree, batch 1) at every length of --lengths, then decode steps, counting the
    graphs Dynamo compiled. On a model of the same shapes with --recompile-layers layers: what Dynamo guards
    on does not depend on the layer count, and every compile of the whole model costs minutes of Triton builds.

    Two callers: the one-graph one (flagtree_py/models/dynamic_length.py: flagtree's SDPA attention, a 4D mask
    from the caller, the first call traced with a dynamic length), whose count is the issue's figure, and the
    plain one (`torch.compile(forward, backend="flagtree")`, transformers' masks, Dynamo's defaults), kept as
    the evidence of why the recipe is needed. Both then time decode steps at length 1: through the dynamic
    graph vs the plain caller's length-1 graph (static), CUDA graphs on for length 1 in both."""
    from flagtree_py.models import dynamic_length

    result = {"layers": args.recompile_layers, "lengths": args.length_list, "decode_context": max(args.length_list),
              "size_oblivious_supported": dynamic_length.size_oblivious_supported()}
    result.update(_guarded(_length_sweep, args, device, True))
    result["plain_call"] = _guarded(_length_sweep, args, device, False)
    result["per_length_note"] = (
        "triton_compiles at a length with no new Dynamo graph are Triton JIT builds of kernels first used at that "
        "length (compiled_kernels names them): a GEMM's M bucket (m16: <= 16 rows, m128: <= 128, large), the "
        "attention prefill kernel (from 17 tokens on with 4 query heads per KV head), or Triton's specialization "
        "of integer kernel arguments divisible by 16 (lengths, in the attention kernels). flagtree's "
        "runtime choosing kernels per length bucket, not Dynamo: once per bucket per process")
    return result


def _length_sweep(args, device: str, one_graph: bool) -> dict:
    import flagtree_py
    from flagtree_py.models import dynamic_length
    from flagtree_py.runtime import launch

    torch._dynamo.reset()
    flagtree_py.clear_report()
    lm, _ = build(args, args.recompile_layers)
    lengths, steps = args.length_list, args.tokens + 2  # 2 untimed: the first warms, the second captures
    decoder = Decoder(lm, 1, max(lengths) + steps + 1, device)
    forward = decoder.forward
    if one_graph:
        dynamic_length.use_flagtree_attention(lm)

        def forward(ids, positions):  # what a one-graph caller writes
            mask = dynamic_length.static_cache_mask(positions, decoder.max_len)
            return lm(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=decoder.cache,
                      use_cache=True).logits
    # CUDA graphs for length 1 (decode) only: a captured graph per prompt length would be memory for nothing
    options = {"target": "interpreter" if args.smoke else "auto", "cuda_graphs": not args.smoke,
               "cuda_graph_sizes": (1,)}
    step = torch.compile(forward, backend="flagtree", options=options)
    from torch._dynamo.utils import counters

    new_graph_at, per_length = [], []
    before = _dynamo_graphs()
    breaks_before = dict(counters["graph_break"])
    with torch.no_grad():
        for index, length in enumerate(lengths):
            decoder.cache.reset()
            ids = torch.randint(0, lm.config.vocab_size, (1, length), device=device)
            positions = torch.arange(length, device=device).unsqueeze(0)
            seen, compiles, kernels = _dynamo_graphs(), launch.counters["triton_compiles"], _kernel_compiles()
            t0 = time.perf_counter()
            if one_graph and index == 0:
                with dynamic_length.any_length(ids, positions):
                    logits = step(ids, positions)
            else:
                logits = step(ids, positions)
            synchronize(device)
            compiled = _kernel_compiles()
            per_length.append({"length": length, "s": round(time.perf_counter() - t0, 3),
                               "new_graphs": _dynamo_graphs() - seen,
                               "triton_compiles": launch.counters["triton_compiles"] - compiles,
                               "compiled_kernels": sorted(k for k in compiled if compiled[k] > kernels.get(k, 0))})
            if _dynamo_graphs() > seen:
                new_graph_at.append(length)
        # decode after the longest prompt, through whatever graph serves length 1
        graphs_before_decode = _dynamo_graphs()
        tokens, start = logits[:, -1:].argmax(-1), max(lengths)
        positions = [torch.full((1, 1), start + i, device=device) for i in range(steps)]
        for i in range(steps):
            if i == 2:
                synchronize(device)
                t0 = time.perf_counter()
            tokens = step(tokens, positions[i])[:, -1:].argmax(-1)
        synchronize(device)
        decode_ms = 1000 * (time.perf_counter() - t0) / (steps - 2)
    records = flagtree_py.report()
    flagtree_py.clear_report()
    recompile_reasons = _recompile_reasons()
    breaks: dict = {}
    for reason, n in counters["graph_break"].items():
        if n > breaks_before.get(reason, 0):
            short = _short_reason(reason)
            breaks[short] = breaks.get(short, 0) + n - breaks_before.get(reason, 0)
    decoder = step = lm = None
    if device == "cuda":
        torch.cuda.empty_cache()
    # a recompile: a length after the first that made Dynamo compile again (each compile may hold several
    # graphs when the forward has graph breaks, listed apart)
    return {"recompiles": max(0, len(new_graph_at) - 1), "new_graph_at_lengths": new_graph_at,
            "dynamo_graphs": _dynamo_graphs() - before, "graph_breaks": breaks, "flagtree_graphs": len(records),
            "dynamic_symbols": sorted({s for r in records for s in r.get("dynamic_symbols", [])}),
            "shape_guards_added": [g for r in records for g in r.get("shape_guards_added", [])],
            "graph_fallbacks": [r.get("error") for r in records if r.get("fallback") == "graph"],
            "recompile_reasons": recompile_reasons,
            "per_length": per_length,
            "decode": {"steps_timed": steps - 2, "ms_per_step": round(decode_ms, 3),
                       "new_graphs": _dynamo_graphs() - graphs_before_decode,
                       "cuda_graphs": [r.get("cuda_graphs") for r in records],
                       "cuda_graph_counts": [dict(r.get("cuda_graph_counts", {})) for r in records]}}


def _recompile_reasons(limit: int = 8) -> list[str]:
    """The guards that failed when Dynamo compiled again since the sweep's `torch._dynamo.reset()`, each with
    the source line that made it (Dynamo's text, as TORCH_LOGS=recompiles prints it), so that a recompile
    on the GPU machine names its cause in the JSON. Empty when nothing recompiled."""
    from torch._dynamo.utils import guard_failures

    reasons = [" ".join(str(reason).split()) for failures in guard_failures.values() for reason in failures]
    return [reason[:600] for reason in reasons[:limit]]


def _kernel_compiles() -> dict:
    """Triton compiles so far per flagtree kernel name (GPU only: interpreted kernels compile nothing)."""
    from flagtree_py.runtime import launch

    found: dict = {}
    for reference in list(launch._OWNERS.values()):
        kernel = reference()
        if kernel is not None:
            found[kernel.name] = found.get(kernel.name, 0) + kernel.compiles
    return found


def _short_reason(reason: str) -> str:
    """Dynamo's graph-break text, cut to its first line and the source line it broke on."""
    lines = reason.splitlines()
    code = next((line.strip() for line in lines if ", code: " in line), "")
    return f"{lines[0]} at {code}" if code else lines[0]


# -- the parent: bandwidth, roofline, one subprocess per mode, JSON and chart --------------------------------


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    size = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    repeats = 20 if device == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - t0)


def bytes_per_step(args, batch: int) -> dict:
    """What one decode step must read from memory at least: every weight it uses once, and the context's KV."""
    from flagtree_py.models import build_model, real_config, tiny_config

    _, dtype = device_and_dtype(args)
    config = tiny_config(args.model) if args.smoke else real_config(args.model)
    meta = build_model(config, dtype=dtype, device="meta", num_layers=args.layers).causal_lm
    element = torch.finfo(dtype).bits // 8
    config = meta.config
    embedding = meta.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in meta.named_parameters() if ".experts." in n)
    other = sum(p.numel() for p in meta.parameters()) - embedding - experts
    if experts:  # uniform random routing of `batch` tokens: expected distinct experts per layer
        total, top_k = config.num_experts, config.num_experts_per_tok
        used = total * (1 - (1 - top_k / total) ** batch) / total
    else:
        used = 0.0
    weights = (other + experts * used + batch * config.hidden_size) * element
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * args.context * batch * element
    return {"weights": int(weights), "kv_cache": int(kv), "total": int(weights + kv),
            "expert_fraction_read": round(used, 4) if experts else None}


def run_mode(args, name: str, environment: dict, remaining_s: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--worker-out", out]
    started = time.perf_counter()
    try:
        finished = subprocess.run(command, check=False, env=environment, capture_output=True, text=True,
                                  timeout=min(args.mode_timeout_s, max(remaining_s, 30)))
        text = Path(out).read_text() if Path(out).stat().st_size else ""
        result = json.loads(text) if text else {"mode": name, "error": f"exit {finished.returncode}, no result"}
        if finished.returncode != 0:
            result["exit_status"] = finished.returncode
            result["stderr_tail"] = finished.stderr[-3000:]
    except subprocess.TimeoutExpired:
        result = {"mode": name, "error": f"timed out after {min(args.mode_timeout_s, max(remaining_s, 30)):.0f} s"}
    finally:
        Path(out).unlink(missing_ok=True)
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def parent(args) -> dict:
    import transformers
    import triton

    device, dtype = device_and_dtype(args)
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    report = {
        "benchmark": "decode", "model": args.model, "layers": args.layers, "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "context": args.context, "timed_steps": args.tokens,
        "warmup_steps": args.warmup, "batches": args.batches, "date": time.strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bytes_per_step": {str(b): bytes_per_step(args, b) for b in args.batches},
        "modes": {},
        "notes": ["ms_per_step is one decode step: one new token for each of `batch` sequences",
                  ("roofline floor = bytes_per_step.total / copy bandwidth; KV counted at the context length, "
                   "although transformers' static cache attends over its whole (masked) buffer")],
    }
    report["roofline_ms"] = {b: round(1000 * v["total"] / bandwidth, 3) for b, v in report["bytes_per_step"].items()}
    # empty caches (flagtree's, Triton's kernels, Inductor's): every mode's first process compiles cold
    scratch = Path(tempfile.mkdtemp(prefix="flagtree-decode-"))
    environment = {**os.environ, "FLAGTREE_CACHE_DIR": str(scratch / "flagtree"),
                   "DECODE_PRECOMPILED": str(scratch / "decode_step.precompiled"),
                   "TRITON_CACHE_DIR": str(scratch / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    report["caches"] = (f"fresh per run under {scratch}; flagtree-warm and the precompile processes reuse "
                        "flagtree's and Triton's")
    names = []
    # flagtree (the subject) right after eager (the reference); Inductor last, where the budget may skip it
    for mode in sorted(args.mode_list, key=("eager", "flagtree", "reduce-overhead", "max-autotune").index):
        names.append(mode)
        if mode == "flagtree" and not args.recompiles_only:
            names += FLAGTREE_LATER  # later processes: the same graphs, found in the cache; then precompiled
    for name in names:
        remaining = args.budget_s - (time.perf_counter() - started)
        if remaining <= 0:
            report["modes"][name] = {"mode": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        print(f"decode: {name} ...", file=sys.stderr, flush=True)
        report["modes"][name] = result = run_mode(args, name, environment, remaining)
        for batch, entry in result.get("batches", {}).items():
            if "ms_per_step" in entry:
                entry["roofline_percent"] = round(100 * report["roofline_ms"][batch] / entry["ms_per_step"], 1)
        print(f"decode: {name}: {_brief(result)}", file=sys.stderr, flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def _brief(result: dict) -> str:
    if "error" in result or "skipped" in result:
        return result.get("error") or result["skipped"]
    parts = [f"b{b}: {e['ms_per_step']} ms/step, first call {e['first_call_s']} s" if "ms_per_step" in e
             else f"b{b}: {e.get('error', '?')[:200]}" for b, e in result["batches"].items()]
    lengths = result.get("recompiles", {})
    if "recompiles" in lengths:
        plain = lengths.get("plain_call", {})
        parts.append(f"recompiles over lengths: {lengths['recompiles']} (plain call: {plain.get('recompiles', '?')}); "
                     f"decode at length 1: {lengths['decode']['ms_per_step']} ms/step through the dynamic graph, "
                     f"{plain.get('decode', {}).get('ms_per_step', '?')} through the plain call's")
    elif "error" in lengths:
        parts.append(f"recompiles: {lengths['error'][:200]}")
    agreement = result.get("agreement", {})
    if "top1_agreement" in agreement:
        parts.append(f"top-1 vs eager {agreement['top1_agreement']:.2%} over {agreement['positions']} positions")
        margin = agreement.get("margin_aware", {})
        if "top1_vs_reference" in margin:
            vs, kept = margin["top1_vs_reference"], margin["top1_agreement_kept"]
            parts.append(f"vs float32: eager {vs['eager']:.2%}, compiled {vs['compiled']:.2%}; "
                         f"{'n/a' if kept is None else f'{kept:.2%}'} over the {margin['positions_kept']} positions "
                         f"with a float32 margin above {margin['min_margin']:.3g}")
    return "; ".join(parts)


def chart(report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    batches = [str(b) for b in report["batches"]]
    # the later flagtree processes measure compile time; their steps run the same kernels as flagtree's
    modes = [m for m, r in report["modes"].items()
             if m not in FLAGTREE_LATER and any("ms_per_step" in e for e in r.get("batches", {}).values())]
    figure, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        values = [report["modes"][m]["batches"].get(batch, {}).get("ms_per_step", math.nan) for m in modes]
        axis.bar(modes, values, color="tab:blue")
        axis.axhline(report["roofline_ms"][batch], color="tab:red", linestyle="--", label="HBM roofline")
        axis.set_title(f"{report['model']} ({report['layers'] or 'all'} layers), batch {batch}")
        axis.set_ylabel("ms per decode step")
        axis.tick_params(axis="x", rotation=30)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result, indent=1))
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("decode: needs a CUDA GPU (or --smoke for tiny shapes on the CPU)", file=sys.stderr)
        return 2
    report = parent(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["chart"] = chart(report, out.with_suffix(".png"))
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({m: _brief(r) for m, r in report["modes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
