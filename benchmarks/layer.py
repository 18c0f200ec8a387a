"""One decoder layer, real shapes, random bf16 weights: eager, eager + CUDA graph, Inductor (default and
max-autotune) and flagtree (CUDA graphs on), in one run.

Cases: a Qwen3-8B layer (decode B=1 and B=32 at context 1024 over a static KV cache, prefill 2048), a
Qwen3-30B-A3B MoE layer (decode B=1, prefill 2048) and a Step3 MoE layer (decode B=1 without a cache:
Step3's port has none; prefill 512). Decode writes its new K/V into the static cache with index_copy_
at a fixed position (a tensor input) and attends over the whole cache through an explicit mask, the
form transformers' StaticCache + SDPA produce; every timed call writes the same slot, so repeated calls
and the error check see the same state.

Per case and mode the JSON holds: ms (median, triton.testing.do_bench, L2 flushed between calls),
% of the HBM floor (floor = bytes of the weights read + KV cache read, divided by the copy bandwidth
measured in this run), TFLOP/s, max abs error vs eager (and relative to eager's largest magnitude),
compile s (the first call), and for flagtree the report (kernels, externs, CUDA graph replays).
A mode that fails records its error and the run goes on. A PNG bar chart is written next to the JSON
when matplotlib is importable.

    python benchmarks/layer.py --out benchmarks/results/layer_h100.json          # H100, ~8 min
    python benchmarks/layer.py --smoke --out /tmp/layer_smoke.json                # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time
import traceback
from dataclasses import dataclass

import torch
from torch import nn

import flagtree_py
from flagtree_py.models import real_config, tiny_config

MODES = ["eager", "eager_cuda_graph", "inductor", "inductor_max_autotune", "flagtree"]
GPU_ONLY = {"eager_cuda_graph", "inductor_max_autotune"}
ANCHORS = {"qwen3-8b decode B=1 ctx=1024", "qwen3-8b prefill 2048"}  # the measured anchors


class FixedPositionCache:
    """A static KV cache for one layer, written at `position` (a tensor) by index_copy_, read whole."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor) -> None:
        self.keys, self.values, self.position = keys, values, position

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values


class HFLayerStep(nn.Module):
    """A transformers Qwen3 / Qwen3-MoE decoder layer with its rotary embedding: hidden -> hidden."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, cache: FixedPositionCache | None) -> None:
        super().__init__()
        self.layer, self.rotary, self.cache = layer, rotary, cache

    def forward(self, hidden, position_ids, mask):
        cos, sin = self.rotary(hidden, position_ids)
        return self.layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                          position_embeddings=(cos, sin))


class Step3LayerStep(nn.Module):
    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden, position_ids, mask):
        cos, sin = self.rotary(position_ids, hidden.dtype)
        return self.layer(hidden, cos, sin)


@dataclass
class Case:
    name: str
    model: str  # qwen3 | qwen3-30b-a3b | step3
    batch: int
    q_len: int
    context: int  # KV length attended (decode: the static cache length)
    decode: bool


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case("qwen3 decode B=1 ctx=16", "qwen3", 1, 1, 16, True),
                Case("qwen3 decode B=2 ctx=16", "qwen3", 2, 1, 16, True),
                Case("qwen3 prefill 12", "qwen3", 1, 12, 12, False),
                Case("qwen3-30b-a3b decode B=1 ctx=16", "qwen3-30b-a3b", 1, 1, 16, True),
                Case("step3 prefill 12", "step3", 1, 12, 12, False)]
    return [Case("qwen3-8b decode B=1 ctx=1024", "qwen3", 1, 1, 1024, True),
            Case("qwen3-8b decode B=32 ctx=1024", "qwen3", 32, 1, 1024, True),
            Case("qwen3-8b prefill 2048", "qwen3", 1, 2048, 2048, False),
            Case("qwen3-30b-a3b decode B=1 ctx=1024", "qwen3-30b-a3b", 1, 1, 1024, True),
            Case("qwen3-30b-a3b prefill 2048", "qwen3-30b-a3b", 1, 2048, 2048, False),
            Case("step3 decode B=1 (no cache)", "step3", 1, 1, 1, False),
            Case("step3 prefill 512", "step3", 1, 512, 512, False)]


def _init(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights like HF's init (normal, std 0.02; norms at 1): no checkpoint is loaded."""
    for name, param in module.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))


def build_step(case: Case, smoke: bool, dtype: torch.dtype, device: str, experts: str):
    """The layer step module and its inputs (hidden, position_ids, mask)."""
    generator = torch.Generator().manual_seed(0)
    config = copy.deepcopy(tiny_config(case.model) if smoke else real_config(case.model))
    with torch.device(device):
        if case.model == "step3":
            from flagtree_py.models.step3 import Step3DecoderLayer, Step3RotaryEmbedding

            layer_id = min(config.moe_layer_ids())  # a MoE layer: routed experts + shared expert
            step = Step3LayerStep(Step3DecoderLayer(config, layer_id), Step3RotaryEmbedding(config.head_dim,
                                                                                             config.rope_theta))
            kv_heads = 1
        else:
            config._attn_implementation = "sdpa"
            if case.model == "qwen3":
                from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer as Layer
                from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding as Rotary
            else:
                from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer as Layer
                from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding as Rotary

                config._experts_implementation = experts
            cache = None
            kv_heads = config.num_key_value_heads
            if case.decode:
                shape = (case.batch, kv_heads, case.context, config.head_dim)
                keys = torch.randn(shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
                values = torch.randn(shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
                cache = FixedPositionCache(keys, values, torch.tensor([case.context - 1], device=device))
            step = HFLayerStep(Layer(config, 0), Rotary(config), cache)
    _init(step, generator)
    step = step.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if getattr(step, "cache", None) is not None:  # the rotary buffers stay fp32; the cache in dtype
        step.rotary.inv_freq = step.rotary.inv_freq.float()
    hidden = torch.randn(case.batch, case.q_len, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    start = case.context - case.q_len if case.decode else 0
    position_ids = torch.arange(start, start + case.q_len, device=device)[None].expand(case.batch, -1)
    mask = None
    if case.decode and case.model != "step3":
        # an explicit mask over the whole cache length: position p sees keys 0..p
        mask = (torch.arange(case.context, device=device)[None, :] <= position_ids[0][:, None])[None, None]
        mask = mask.expand(case.batch, 1, case.q_len, case.context)
    return step, (hidden, position_ids, mask), config, kv_heads


def floor_and_flops(case: Case, step: nn.Module, config, kv_heads: int, dtype: torch.dtype) -> tuple[int, float]:
    """Bytes the layer must read (weights it uses + KV cache) and the FLOPs it does."""
    element = torch.finfo(dtype).bits // 8
    tokens = case.batch * case.q_len
    expert_params, other_params = 0, 0
    for name, param in step.named_parameters():
        if "experts" in name or name.split(".")[-2:-1] in (["gate_proj"], ["up_proj"], ["down_proj"]) and param.dim() == 3:
            expert_params += param.numel()
        else:
            other_params += param.numel()
    if case.model == "qwen3-30b-a3b":
        per_expert = expert_params / config.num_experts
        active = min(config.num_experts, config.num_experts_per_tok * tokens)  # experts one step can touch
        weight_bytes = (other_params + active * per_expert) * element
        matmul_params_per_token = other_params + config.num_experts_per_tok * per_expert
    else:  # dense, and Step3's port computes every expert densely
        weight_bytes = (other_params + expert_params) * element
        matmul_params_per_token = other_params + expert_params
    heads, head_dim = config.num_attention_heads, config.head_dim
    kv_bytes = 2 * case.batch * kv_heads * case.context * head_dim * element if case.decode else 0
    attention = 4 * case.batch * heads * case.q_len * case.context * head_dim
    if not case.decode:
        attention /= 2  # causal
    return int(weight_bytes + kv_bytes), 2 * tokens * matmul_params_per_token + attention


def timer(smoke: bool, rep: int = 100):
    """`bench(fn) -> ms`: triton's do_bench median on the GPU; three wall-clock runs with --smoke (CPU)."""
    if smoke:
        def bench(fn):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        return bench
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth(device: str, smoke: bool) -> float:
    """Bytes per second of a large device copy (read + write), measured now."""
    numel = (64 << 20) if smoke else (1 << 30)
    src = torch.empty(numel, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(smoke)(lambda: dst.copy_(src))
    return 2 * numel / (ms / 1e3)


def make_mode(mode: str, step: nn.Module, inputs: tuple, smoke: bool):
    """A zero-argument callable running `step(*inputs)` the `mode` way."""
    if mode == "eager":
        return lambda: step(*inputs)
    if mode == "eager_cuda_graph":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(*inputs)

        def replay():
            graph.replay()
            return out
        return replay
    if mode == "inductor":
        compiled = torch.compile(step, dynamic=False)
    elif mode == "inductor_max_autotune":
        compiled = torch.compile(step, mode="max-autotune", dynamic=False)
    elif mode == "flagtree":
        # cache off: compile_s is a cold flagtree compile (Triton's own kernel cache may still be warm)
        compiled = torch.compile(step, backend="flagtree", dynamic=False, options={"cuda_graphs": True, "cache": False})
    else:
        raise ValueError(mode)
    return lambda: compiled(*inputs)


def run_case(case: Case, args, bandwidth: float) -> dict:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    result: dict = {"case": case.name, "batch": case.batch, "q_len": case.q_len, "context": case.context}
    step, inputs, config, kv_heads = build_step(case, args.smoke, dtype, device, args.moe_experts)
    floor_bytes, flops = floor_and_flops(case, step, config, kv_heads, dtype)
    floor_ms = floor_bytes / bandwidth * 1e3
    result.update({"floor_bytes": floor_bytes, "floor_ms": round(floor_ms, 4), "gflop": round(flops / 1e9, 3)})
    bench = timer(args.smoke)
    with torch.no_grad():
        reference = step(*inputs).float()
        scale = max(reference.abs().max().item(), 1e-30)
        modes = {}
        for mode in MODES:
            entry: dict = {}
            modes[mode] = entry
            if args.smoke and mode in GPU_ONLY:
                entry["skipped"] = "needs a CUDA GPU (--smoke runs on the CPU)"
                continue
            if args.smoke and mode == "inductor" and not args.smoke_inductor:
                entry["skipped"] = "--smoke without --smoke-inductor (Inductor's CPU C++ build is slow here)"
                continue
            if mode == "inductor_max_autotune" and not (args.max_autotune == "all" or
                                                        (args.max_autotune == "anchors" and case.name in ANCHORS)):
                entry["skipped"] = f"--max-autotune {args.max_autotune}"
                continue
            torch._dynamo.reset()
            flagtree_py.clear_report()
            try:
                start = time.perf_counter()
                fn = make_mode(mode, step, inputs, args.smoke)
                out = fn()
                if not args.smoke:
                    torch.cuda.synchronize()
                entry["compile_s"] = round(time.perf_counter() - start, 2)
                for _ in range(2):  # flagtree's CUDA graphs: warm-up, capture
                    out = fn()
                error = (out.float() - reference).abs().max().item()
                entry["max_abs_err_vs_eager"] = error
                entry["rel_err_vs_eager"] = error / scale
                ms = bench(fn)
                entry["ms"] = round(ms, 4)
                entry["pct_of_hbm_floor"] = round(100 * floor_ms / ms, 1)
                entry["tflops"] = round(flops / (ms / 1e3) / 1e12, 2)
                if mode == "flagtree":
                    entry["flagtree"] = summarize(flagtree_py.report())
                if args.profile and not args.smoke and mode in ("flagtree", "inductor", "eager_cuda_graph"):
                    entry["kernels_per_call"] = profile_kernels(fn)
            except Exception as error:  # noqa: BLE001  (one failing mode must not stop the run)
                entry["error"] = f"{type(error).__name__}: {str(error)[:500]}"
                entry["traceback"] = traceback.format_exc()[-2000:]
            print(f"  {mode:24s} " + json.dumps({k: v for k, v in entry.items() if k not in ("traceback", "flagtree")}),
                  flush=True)
    result["modes"] = modes
    del step, inputs
    gc.collect()
    if not args.smoke:
        torch.cuda.empty_cache()
    return result


def profile_kernels(fn, calls: int = 20) -> list[dict]:
    """GPU time per call of each kernel (torch.profiler, CUPTI), largest first: where a mode's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = event.self_cuda_time_total
        if device_us > 0:
            rows.append({"kernel": event.key[:120], "us_per_call": round(device_us / calls, 2),
                         "launches_per_call": round(event.count / calls, 2)})
    rows.sort(key=lambda row: -row["us_per_call"])
    total = round(sum(row["us_per_call"] for row in rows), 2)
    return [{"kernel": "(all kernels)", "us_per_call": total}] + rows[:25]


def summarize(records: list[dict]) -> dict:
    keys = ("triton_kernels", "kernel_failures", "codegen_fallbacks", "cuda_graphs", "cuda_graph_counts",
            "cuda_graph_skips", "compile_s", "fallback", "error")
    return {"graphs": [
        {k: (dict(r[k]) if k == "cuda_graph_counts" else r[k]) for k in keys if k in r}
        | {"extern_ops": sorted(set(r.get("extern_ops", []))),
           "attention_kernels": sorted(k["name"] for k in r.get("kernels", []) if k["kind"].startswith("attention")),
           "passes": {k: v for k, v in r.get("passes", {}).items() if v}}
        for r in records]}


def plot(report: dict, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no PNG"
    names = [c["case"] for c in report["cases"] if "modes" in c]
    figure, axis = plt.subplots(figsize=(max(8, 2.2 * len(names)), 5))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = [c["modes"][mode].get("ms", 0) for c in report["cases"] if "modes" in c]
        axis.bar([x + i * width for x in range(len(names))], values, width, label=mode)
    floors = [c["floor_ms"] for c in report["cases"] if "modes" in c]
    axis.scatter([x + 0.4 - width / 2 for x in range(len(names))], floors, marker="_", s=400, color="k",
                 label="HBM floor", zorder=3)
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("ms (median, log scale)")
    axis.set_title(f"one decoder layer, {report['device']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON path (the PNG goes next to it)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--smoke-inductor", action="store_true", help="also run Inductor in --smoke")
    parser.add_argument("--max-autotune", choices=["anchors", "all", "none"], default="anchors",
                        help="which cases run Inductor max-autotune (slow to compile); default: the issue's anchors")
    parser.add_argument("--moe-experts", default="grouped_mm",
                        help="transformers experts implementation for Qwen3-MoE (batched_mm gathers weights per token)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: record each kernel's time per call (torch.profiler) for flagtree, Inductor, eager+graph")
    parser.add_argument("--cases", default="", help="comma-separated substrings: run only matching cases")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = False
    import transformers
    import triton

    device = "cpu" if args.smoke else "cuda"
    report = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "flagtree_commit": _commit(), "args": vars(args),
    }
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.smoke)
    report["copy_bandwidth_GBps"] = round(bandwidth / 1e9, 1)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    report["cases"] = []
    wanted = [w for w in args.cases.split(",") if w]
    for case in cases(args.smoke):
        if wanted and not any(w in case.name for w in wanted):
            continue
        print(f"== {case.name}", flush=True)
        try:
            entry = run_case(case, args, bandwidth)
        except Exception as error:  # noqa: BLE001  (a case that cannot even be built)
            entry = {"case": case.name, "error": f"{type(error).__name__}: {str(error)[:500]}",
                     "traceback": traceback.format_exc()[-2000:]}
            print("  " + entry["error"], flush=True)
        report["cases"].append(entry)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    report["png"] = plot(report, args.out.rsplit(".", 1)[0] + ".png")
    report["table"] = table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(report["table"]))
    print(f"wall {report['wall_s']} s; png: {report['png']}")


def table(report: dict) -> list[str]:
    lines = [f"{'case':36s} {'floor ms':>9s} " + " ".join(f"{m[:18]:>18s}" for m in MODES)]
    for case in report["cases"]:
        if "modes" not in case:
            lines.append(f"{case['case']:36s} error: {case.get('error')}")
            continue
        cells = []
        for mode in MODES:
            entry = case["modes"][mode]
            if "ms" in entry:
                cells.append(f"{entry['ms']:.3f} ({entry['pct_of_hbm_floor']:.0f}%)")
            else:
                cells.append("skip" if "skipped" in entry else "ERROR")
        lines.append(f"{case['case']:36s} {case['floor_ms']:9.3f} " + " ".join(f"{c:>18s}" for c in cells))
    return lines


def _commit() -> str:
    import subprocess
    from pathlib import Path

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
