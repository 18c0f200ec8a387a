"""Memory of merged projections (merge_qkv, merge_gate_up) on one real-shape Qwen3-8B decoder layer.

Each case runs in a fresh process (so that peaks do not leak between them), builds the model with
random weights (real Qwen3-8B layer shapes: hidden 4096, 32/8 heads of 128, intermediate 12288; the
vocabulary is cut to 1024 because the embedding and LM head are not part of the decoder layer and
would dominate), compiles it with flagtree and runs it once on a few tokens. Measured:

  module_bytes        bytes of the unique storages behind the model's state_dict (a parameter
                      viewed into a merged buffer counts once): what the model holds
  layer_bytes         the same for the decoder layer alone
  rss_bytes           the process's resident set (VmRSS) before compile and after the first call
  peak_rss_delta      the peak resident set (VmHWM, reset through /proc/self/clear_refs just
                      before compiling) during compile + first call, minus the RSS before it
  kept_twice_bytes    for reference: what a merge that kept a concatenated copy next to the
                      parameters would add (the q/k/v and gate/up weights once more)

CPU is enough (the kernels run in Triton's interpreter); torch's CPU allocator keeps no statistics,
hence storages and RSS. With --device cuda the CUDA allocator's figures are added:
  cuda_allocated_before/after   torch.cuda.memory_allocated() before compiling, after the first call
  cuda_peak_delta               torch.cuda.max_memory_allocated() (reset before compiling) minus the
                                allocation before it: the transient of compile + first call

    python benchmarks/merge_memory.py --out merge_memory.json [--dtype bfloat16] [--tokens 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _unique_bytes(module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}
    return sum(storages.values())


def run_case(merge: bool, dtype_name: str, tokens: int, device: str = "cpu") -> dict:
    import torch

    import flagtree_py
    from flagtree_py.models import build_model, real_config

    dtype = getattr(torch, dtype_name)
    config = copy.deepcopy(real_config("qwen3"))
    config.vocab_size = 1024
    model = build_model(config, dtype=dtype, num_layers=1, seed=0, device=device)
    layer = model.causal_lm.model.layers[0]
    ids = torch.randint(0, 1024, (1, tokens), device=device)
    cuda = device == "cuda"
    attn, mlp = layer.self_attn, layer.mlp
    merged_params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
    result = {
        "merge_projections": merge,
        "module_bytes_before": _unique_bytes(model),
        "layer_bytes_before": _unique_bytes(layer),
        "kept_twice_bytes": sum(p.numel() * p.element_size() for p in merged_params),
        "rss_bytes_before": _status("VmRSS"),
    }
    with torch.no_grad():
        reference = model(ids).float()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    rss_before = _status("VmRSS")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result["cuda_allocated_before"] = torch.cuda.memory_allocated()
    start = time.perf_counter()
    compiled = torch.compile(model, backend="flagtree",
                             options={"target": "auto", "cache": False, "merge_projections": merge})
    with torch.no_grad():
        out = compiled(ids).float()
    if cuda:
        torch.cuda.synchronize()
        result["cuda_allocated_after"] = torch.cuda.memory_allocated()
        result["cuda_peak_delta"] = torch.cuda.max_memory_allocated() - result["cuda_allocated_before"]
    result["compile_and_first_call_s"] = round(time.perf_counter() - start, 2)
    result["peak_rss_delta"] = _status("VmHWM") - rss_before
    result["rss_bytes_after"] = _status("VmRSS")
    result["module_bytes_after"] = _unique_bytes(model)
    result["layer_bytes_after"] = _unique_bytes(layer)
    result["max_rel_err_vs_eager"] = ((out - reference).abs().max() / reference.abs().max()).item()
    (record,) = flagtree_py.report()
    result["passes"] = {k: v for k, v in record["passes"].items() if k.startswith(("merge_", "fuse_"))}
    result["gemms"] = sum(op in ("aten.mm.default", "aten.addmm.default") for op in record["extern_ops"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="merge_memory.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--case", choices=["merged", "unmerged"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case == "merged", args.dtype, args.tokens, args.device)))
        return
    import torch

    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
              "model": "Qwen3-8B, 1 decoder layer, real shapes, random weights, vocabulary 1024",
              "dtype": args.dtype, "tokens": args.tokens, "device": args.device, "cases": []}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for case in ("unmerged", "merged"):
        child = subprocess.run([sys.executable, __file__, "--case", case, "--dtype", args.dtype, "--device", args.device,
                                "--tokens", str(args.tokens)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            report["cases"].append({"case": case, "error": child.stderr[-3000:]})
            continue
        report["cases"].append({"case": case, **json.loads(child.stdout.strip().splitlines()[-1])})
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
