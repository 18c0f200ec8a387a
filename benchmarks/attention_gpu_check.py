"""GPU check of flagtree's attention kernels and of CUDA graph replay (the parts a CPU cannot run).

1. Attention, bf16, real head shapes (Qwen3-8B 32/8x128, Qwen3-30B-A3B 32/4x128, Step3 64/1x256):
   prefill (causal; boolean mask; odd length) and decode over a static cache (B=1 and B=32, context
   1024, explicit mask), compiled with flagtree. Error vs an fp32 reference, next to eager bf16 SDPA's
   own error; passes when flagtree's error <= 2x eager's + 1e-2 of the reference's magnitude. Also
   times flagtree's attention against torch's SDPA (attention alone, do_bench median).
2. CUDA graphs: the tiny Qwen3 in bf16 decodes 8 tokens over transformers' StaticCache with
   `cuda_graphs=True`. The cache and its length counter are inputs the graph mutates in place; the
   check compares every step's logits and the final cache with eager, and reads the report's replay
   counts. Then a new cache object (moved inputs: recapture) and sizes outside `cuda_graph_sizes`.

    python benchmarks/attention_gpu_check.py --out attention_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F

import flagtree_py

SHAPES = {"qwen3-8b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128), "step3": (64, 1, 256)}


def _reference(q, k, v, mask, causal):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), attn_mask=mask, is_causal=causal)


def _case(batch: int, q_len: int, kv_len: int, causal: bool, mask: str | None) -> dict:
    return {"batch": batch, "q_len": q_len, "kv_len": kv_len, "causal": causal, "mask": mask}


def attention_cases():
    for model in SHAPES:
        yield model, "prefill causal 2048", _case(1, 2048, 2048, True, None)
        yield model, "prefill causal 1000 (odd)", _case(1, 1000, 1000, True, None)
        yield model, "prefill bool mask 777", _case(2, 777, 777, False, "bool")
        yield model, "decode B=1 ctx 1024 static cache", _case(1, 1, 1024, False, "cache")
        yield model, "decode B=32 ctx 1024 static cache", _case(32, 1, 1024, False, "cache")


def check_attention(model: str, name: str, c: dict) -> dict:
    from triton.testing import do_bench

    heads, kv_heads, dim = SHAPES[model]
    torch._dynamo.reset()
    flagtree_py.clear_report()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(c["batch"], heads, c["q_len"], dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(c["batch"], kv_heads, c["kv_len"], dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(c["batch"], kv_heads, c["kv_len"], dim, device="cuda", generator=g, dtype=torch.bfloat16)
    mask = None
    if c["mask"] == "bool":
        mask = torch.rand(c["batch"], 1, c["q_len"], c["kv_len"], device="cuda", generator=g) > 0.3
        mask[..., 0] = True
    elif c["mask"] == "cache":  # the last 100 cache slots are not written yet
        mask = (torch.arange(c["kv_len"], device="cuda") < c["kv_len"] - 100)[None, None, None].expand(
            c["batch"], 1, 1, c["kv_len"])

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c["causal"], enable_gqa=True)

    compiled = torch.compile(fn, backend="flagtree", dynamic=False)
    with torch.no_grad():
        out = compiled(q, k, v, mask)
        eager = fn(q, k, v, mask)
        ref = _reference(q, k, v, mask, c["causal"])
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item() / scale
    eager_err = (eager.float() - ref).abs().max().item() / scale
    (record,) = flagtree_py.report()
    kinds = sorted({k["kind"] for k in record["kernels"] if k["kind"].startswith("attention")})
    result = {"model": model, "case": name, "rel_err_vs_fp32": err, "eager_rel_err_vs_fp32": eager_err,
              "flagtree_kernels": kinds, "kernel_failures": record["kernel_failures"],
              "extern_ops": sorted(set(record["extern_ops"]))}
    result["passed"] = bool(kinds) and not record["kernel_failures"] and err <= 2 * eager_err + 1e-2
    result["flagtree_ms"] = do_bench(lambda: compiled(q, k, v, mask), warmup=10, rep=50, return_mode="median")
    result["torch_sdpa_ms"] = do_bench(lambda: fn(q, k, v, mask), warmup=10, rep=50, return_mode="median")
    return result


def check_cuda_graphs() -> dict:
    from transformers import StaticCache

    from flagtree_py.models import build_tiny_model

    torch._dynamo.reset()
    flagtree_py.clear_report()
    causal_lm = build_tiny_model("qwen3", dtype=torch.bfloat16).causal_lm.cuda()

    def step(ids, cache):
        return causal_lm(input_ids=ids, past_key_values=cache, use_cache=True).logits

    compiled = torch.compile(step, backend="flagtree", options={"cuda_graphs": True})
    prompt = torch.randint(0, 256, (1, 5), device="cuda")
    caches = [StaticCache(config=causal_lm.config, max_cache_len=64) for _ in range(2)]
    worst, tokens_equal = 0.0, True
    with torch.no_grad():
        for cache in caches:
            step(prompt, cache)
        token = torch.randint(0, 256, (1, 1), device="cuda")
        for _ in range(8):
            out = compiled(token, caches[0])
            ref = step(token, caches[1])
            worst = max(worst, ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
            tokens_equal &= bool((out.argmax(-1) == ref.argmax(-1)).all())
            token = ref.argmax(-1)
    # relative to the cache's largest value: bf16 keys of magnitude ~4 are 1/32 apart
    cache_err = max(((a.keys.float() - b.keys.float()).abs().max() / b.keys.float().abs().max()).item()
                    for a, b in zip(caches[0].layers, caches[1].layers))
    records = flagtree_py.report()
    result = {"decode_steps": 8, "max_rel_err_vs_eager": worst, "greedy_tokens_equal": tokens_equal,
              "cache_max_rel_err": cache_err,
              "graphs": [{k: (dict(r[k]) if k == "cuda_graph_counts" else r.get(k))
                          for k in ("cuda_graphs", "cuda_graph_counts", "cuda_graph_skips", "kernel_failures")
                          if k in r} for r in records]}
    counts = [dict(r.get("cuda_graph_counts", {})) for r in records]
    result["passed"] = (worst <= 2e-2 and cache_err <= 2e-2 and any(c.get("replay", 0) >= 5 for c in counts))
    # a new cache object: the inputs read in place moved, the runner captures again
    fresh = StaticCache(config=causal_lm.config, max_cache_len=64)
    with torch.no_grad():
        step(prompt, fresh)
        for _ in range(3):
            compiled(token, fresh)
    result["after_new_cache"] = [dict(r.get("cuda_graph_counts", {})) for r in flagtree_py.report()]
    # sizes outside cuda_graph_sizes run without a graph, with the reason in the report
    torch._dynamo.reset()
    flagtree_py.clear_report()
    lin = torch.nn.Linear(64, 64, device="cuda", dtype=torch.bfloat16)
    dyn = torch.compile(lambda x: torch.relu(lin(x)), backend="flagtree", dynamic=True,
                        options={"cuda_graphs": True, "cuda_graph_sizes": [8]})
    with torch.no_grad():
        for n in (8, 8, 8, 5, 5):
            x = torch.randn(n, 64, device="cuda", dtype=torch.bfloat16)
            assert torch.allclose(dyn(x).float(), torch.relu(lin(x)).float(), atol=2e-2)
    record = flagtree_py.report()[-1]
    result["dynamic_sizes"] = {"counts": dict(record.get("cuda_graph_counts", {})),
                               "skips": record.get("cuda_graph_skips")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "attention": [], "cuda_graphs": None}
    for model, name, case in attention_cases():
        try:
            entry = check_attention(model, name, case)
        except Exception as error:  # noqa: BLE001  (each case is isolated)
            entry = {"model": model, "case": name, "passed": False, "error": f"{type(error).__name__}: {error}"[:800],
                     "traceback": traceback.format_exc()[-2000:]}
        report["attention"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
    try:
        report["cuda_graphs"] = check_cuda_graphs()
    except Exception as error:  # noqa: BLE001
        report["cuda_graphs"] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:800],
                                 "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(report["cuda_graphs"], indent=1)[:4000], flush=True)
    report["passed"] = all(e.get("passed") for e in report["attention"]) and report["cuda_graphs"].get("passed")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("PASSED" if report["passed"] else "FAILED")


if __name__ == "__main__":
    main()
