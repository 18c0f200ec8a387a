"""The Qwen3-30B-A3B MoE block (router + 128 experts, top-8; hidden 2048, moe_intermediate 768), random bf16
weights, on one GPU: eager, Inductor (default) and flagtree's fused experts (flagtree::moe_experts: a counting
sort by expert, grouped gate/up and down GEMMs, a fixed-order k-sum), at 1, 32 and 2048 tokens.

Modes (HF `experts_implementation` in brackets):
  eager                  [grouped_mm]  transformers' own code (torch._grouped_mm on the GPU)
  inductor               [grouped_mm]  torch.compile default
  flagtree               [grouped_mm]  fused experts, CUDA graphs on (as benchmarks/layer.py runs flagtree)
  flagtree_batched_mm    [batched_mm]  the same fused op from HF's other form (should time like flagtree)
  flagtree_gather_gemv   [batched_mm]  fuse_moe_experts left out of the pipeline: the previous decode path
                                       (decompose_batched_gemv: expert GEMVs as gather-reductions), to decide
                                       whether decode should keep it
Per token count and mode the JSON holds ms (median of triton.testing.do_bench), the max abs error against
an fp32 reference (the same weights upcast, eager), and for flagtree modes the compile record's evidence
that the fused kernels ran: fuse_moe_experts count, moe_experts kernels, kernel failures, codegen fallbacks,
extern ops, and the process's kernel fallback count. A mode that fails records its error; the run goes on.

    python benchmarks/moe_gpu.py --out benchmarks/results/moe_h100.json   # H100, a few minutes
    python benchmarks/moe_gpu.py --smoke --out /tmp/moe_smoke.json         # CPU interpreter, tiny shapes, fp32
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import traceback

import torch
from layer import timer

import flagtree_py
from flagtree_py.models import real_config, tiny_config

MODES = ["eager", "inductor", "flagtree", "flagtree_batched_mm", "flagtree_gather_gemv"]
EXPERTS = {"flagtree_batched_mm": "batched_mm", "flagtree_gather_gemv": "batched_mm"}


_BLOCKS: dict = {}


def build_block(smoke: bool, experts: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The MoE block of layer 0 with HF-like random weights (normal, std 0.02): hidden -> hidden. Built
    once per (experts_implementation, dtype) and reused: the same seed gives every form the same weights."""
    key = (experts, dtype)
    if key not in _BLOCKS:
        _BLOCKS[key] = _build_block(smoke, experts, dtype, device)
    return _BLOCKS[key]


def _build_block(smoke: bool, experts: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = copy.deepcopy(tiny_config("qwen3-30b-a3b") if smoke else real_config("qwen3-30b-a3b"))
    config._experts_implementation = experts
    generator = torch.Generator().manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    for param in block.parameters():
        param.data.copy_(torch.randn(param.shape, generator=generator).mul_(0.02))
    return block.to(device=device, dtype=dtype).eval().requires_grad_(False)


def compiled_mode(mode: str, block: torch.nn.Module, smoke: bool):
    if mode == "eager":
        return block
    if mode == "inductor":
        return torch.compile(block, dynamic=False)
    options = {"cache": False, "cuda_graphs": not smoke}
    if smoke:
        options["target"] = "interpreter"
    return torch.compile(block, backend="flagtree", dynamic=False, options=options)


def evidence(records: list[dict]) -> dict:
    from flagtree_py.runtime.launch import counters

    kernels = [k["name"] for r in records for k in r.get("kernels", []) if k["kind"].startswith("moe_experts")]
    return {
        "fuse_moe_experts": sum(r.get("passes", {}).get("fuse_moe_experts", 0) for r in records),
        "decompose_batched_gemv": sum(r.get("passes", {}).get("decompose_batched_gemv", 0) for r in records),
        "moe_experts_kernels": kernels,
        "kernel_failures": [f for r in records for f in r.get("kernel_failures", [])],
        "codegen_fallbacks": [f for r in records for f in r.get("codegen_fallbacks", [])],
        "extern_ops": sorted({op for r in records for op in r.get("extern_ops", [])}),
        "graph_fallback": [r.get("error") for r in records if r.get("fallback")],
        "process_kernel_fallbacks": counters["kernel_fallbacks"],
        "cuda_graphs": [r.get("cuda_graphs") for r in records],
    }


def run_mode(mode: str, tokens: int, args, reference: torch.Tensor, hidden: torch.Tensor) -> dict:
    from flagtree_py import pipeline
    from flagtree_py.passes.fuse_moe_experts import fuse_moe_experts

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    entry: dict = {"mode": mode, "experts_implementation": EXPERTS.get(mode, "grouped_mm")}
    fuse = list(pipeline.FUSE)
    torch._dynamo.reset()
    flagtree_py.clear_report()
    try:
        if mode == "flagtree_gather_gemv":
            pipeline.FUSE[:] = [fn for fn in pipeline.FUSE if fn is not fuse_moe_experts]
        block = build_block(args.smoke, entry["experts_implementation"], dtype, device)
        fn = compiled_mode(mode, block, args.smoke)
        with torch.no_grad():
            start = time.perf_counter()
            out = fn(hidden)
            if not args.smoke:
                torch.cuda.synchronize()
            entry["first_call_s"] = round(time.perf_counter() - start, 3)
            entry["ms"] = timer(args.smoke, rep=200)(lambda: fn(hidden))
            out = fn(hidden)
        error = (out.float() - reference).abs().max().item()
        entry["max_abs_error_vs_fp32"] = error
        entry["max_rel_error_vs_fp32"] = error / max(reference.abs().max().item(), 1e-30)
        if mode.startswith("flagtree"):
            entry["evidence"] = evidence(flagtree_py.report())
    except Exception as error:  # noqa: BLE001 -- a failing mode is a result, not the end of the run
        entry["error"] = f"{type(error).__name__}: {error}"
        entry["traceback"] = traceback.format_exc()[-3000:]
    finally:
        pipeline.FUSE[:] = fuse
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU (Triton interpreter)")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default 1 32 2048; smoke 1 5 40)")
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    token_counts = args.tokens or ([1, 5, 40] if args.smoke else [1, 32, 2048])
    import triton

    report = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "dtype": str(dtype),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "block": "Qwen3-30B-A3B MoE block (tiny config)" if args.smoke else
                       "Qwen3-30B-A3B MoE block: hidden 2048, 128 experts, top-8, moe_intermediate 768",
              "cases": []}
    for tokens in token_counts:
        generator = torch.Generator().manual_seed(tokens)
        hidden_size = (tiny_config if args.smoke else real_config)("qwen3-30b-a3b").hidden_size
        hidden = torch.randn(1, tokens, hidden_size, generator=generator).to(device=device, dtype=dtype)
        # the fp32 reference: the same (bf16-rounded) weights and input, upcast, HF's own per-expert loop
        # ("eager" experts: no grouped_mm, which may not take fp32). A token whose 8th and 9th router logits
        # are closer than bf16's rounding may pick another expert in fp32: the eager mode's own error is the
        # baseline to compare flagtree's with.
        reference_block = copy.deepcopy(build_block(args.smoke, "eager", dtype, device)).float()
        with torch.no_grad():
            reference = reference_block(hidden.float()).float()
        del reference_block
        case = {"tokens": tokens, "modes": []}
        for mode in args.modes:
            entry = run_mode(mode, tokens, args, reference, hidden)
            case["modes"].append(entry)
            shown = entry.get("ms", entry.get("error"))
            print(f"tokens={tokens:5d} {mode:22s} {shown}", flush=True)
        report["cases"].append(case)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
