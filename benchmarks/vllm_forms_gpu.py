"""vLLM's graph forms on the GPU: q/k norm + neox rotary, rotary alone, and vLLM's CPU router, compiled by
flagtree (target auto: nvidia on an H100) in bf16 and fp32, against eager PyTorch.

    PYTHONPATH=$PWD python3 benchmarks/vllm_forms_gpu.py --out $OUT/vllm_forms.json

The modules repeat, op for op, what vLLM 0.32 runs with `custom_ops: ["none"]` (the setting `flagtree serve`
passes): `vllm.ir.ops.rms_norm` per head on [tokens, heads, head_dim], `RotaryEmbedding.forward_static`
(index_select of cos_sin_cache, x1 * cos - x2 * sin / x2 * cos + x1 * sin, cat), the CPU router's
`_softmax_topk` (tests/passes/test_vllm_forms.py checks the same forms on the CPU interpreter). The token
count is symbolic, as in vLLM. Real Qwen3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128), the
qkv GEMM left out (its output is the input) so that the timing is the norm + rotary alone.

Per case the JSON has: fusion counters, kernel count, codegen fallbacks and kernel failures (both must be
empty), max relative error vs eager, and the median time of eager vs flagtree per call (CUDA events, no
CUDA graphs on either side) at 256 tokens (the symbolic graph) and 1 token (Dynamo specializes size 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

HEADS, KV_HEADS, HEAD_DIM, EXPERTS, TOP_K = 32, 8, 128, 128, 8


def rms_norm(x, weight, epsilon):
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    return (x.to(weight.dtype) * weight).to(orig_dtype)


def apply_rotary_emb(x, cos, sin):
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class NormRotary(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        self.qk_norm = qk_norm
        self.q_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        inv_freq = 1.0 / (1000000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        freqs = torch.outer(torch.arange(4096).float(), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def forward(self, positions, qkv):
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        if self.qk_norm:
            q = rms_norm(q.view(*q.shape[:-1], HEADS, HEAD_DIM), self.q_norm, 1e-6).view(q.shape)
            k = rms_norm(k.view(*k.shape[:-1], KV_HEADS, HEAD_DIM), self.k_norm, 1e-6).view(k.shape)
        positions = positions.flatten()
        num_tokens = positions.shape[0]
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        out = []
        for x in (q, k):
            shape = x.shape
            x = x.view(num_tokens, -1, HEAD_DIM)
            out.append(torch.cat((apply_rotary_emb(x[..., :HEAD_DIM], cos, sin), x[..., HEAD_DIM:]), -1).reshape(shape))
        return out[0].view(-1, HEADS, HEAD_DIM), out[1].view(-1, KV_HEADS, HEAD_DIM), v.view(-1, KV_HEADS, HEAD_DIM)


class Router(nn.Module):
    def __init__(self, renormalize: bool) -> None:
        super().__init__()
        self.renormalize = renormalize

    def forward(self, router_logits):
        vals, idx = torch.topk(router_logits, k=TOP_K, dim=-1, sorted=False)
        if self.renormalize:
            vals = torch.softmax(vals, dim=-1)
        else:
            vals = (vals - torch.logsumexp(router_logits, dim=-1, keepdim=True)).exp()
        # dense: the (weight, expert) pairs compared independently of their order (sorted=False)
        return torch.zeros_like(router_logits, dtype=torch.float32).scatter(-1, idx, vals.to(torch.float32))


def _inputs(case: str, tokens: int, dtype, device: str) -> tuple:
    generator = torch.Generator(device=device).manual_seed(tokens)
    if case.startswith("router"):
        return (torch.randn(tokens, EXPERTS, device=device, dtype=dtype, generator=generator),)
    positions = torch.randint(0, 4096, (tokens,), device=device, generator=generator)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return positions, torch.randn(tokens, width, device=device, dtype=dtype, generator=generator)


def _time_ms(fn, inputs, iterations: int = 200) -> float | None:
    if inputs[0].device.type != "cuda":
        return None  # the interpreter (a dry run of this script on a CPU) times nothing worth reporting
    for _ in range(10):
        fn(*inputs)
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _tuple(value) -> tuple:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _error(got: tuple, exact: tuple) -> float:
    return max(((g.float() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, exact))


def run_case(case: str, dtype, device: str, token_counts: tuple[int, ...]) -> dict:
    import flagtree_py

    module = {"qwen3_qk_norm_rope": lambda: NormRotary(True), "step3_rope": lambda: NormRotary(False),
              "router_renormalize": lambda: Router(True), "router_logsumexp": lambda: Router(False)}[case]()
    module = module.to(device, dtype)
    torch._dynamo.reset()
    flagtree_py.clear_report()
    reference = copy.deepcopy(module).float()
    compiled = torch.compile(module, backend="flagtree", options={"cuda_graphs": False})
    result = {"case": case, "dtype": str(dtype)}
    with torch.no_grad():
        for tokens in token_counts:  # the symbolic graph first; a single token is its own (Dynamo specializes 1)
            inputs = _inputs(case, tokens, dtype, device)
            for tensor in inputs:
                if tokens > 1:
                    torch._dynamo.mark_dynamic(tensor, 0)
            got, want = _tuple(compiled(*inputs)), _tuple(module(*inputs))
            # both against float32 math on the same (rounded) weights and inputs: in bf16 flagtree must be
            # no less accurate than eager bf16, which rounds after every op where a fused kernel rounds once
            exact = _tuple(reference(*[t.float() if t.is_floating_point() else t for t in inputs]))
            result[f"max_rel_error_{tokens}"] = _error(got, exact)
            result[f"eager_max_rel_error_{tokens}"] = _error(want, exact)
            result[f"eager_ms_{tokens}"] = _time_ms(module, inputs)
            result[f"flagtree_ms_{tokens}"] = _time_ms(compiled, inputs)
    records = flagtree_py.report()
    result["graphs"] = len(records)
    record = records[0]
    result.update({"passes": {k: v for k, v in record["passes"].items() if k.startswith("fuse")},
                   "triton_kernels": record.get("triton_kernels"),
                   "codegen_fallbacks": record.get("codegen_fallbacks"), "kernel_failures": record.get("kernel_failures"),
                   "extern_ops": record.get("extern_ops"), "target": record.get("target")})
    # fp32: reassociated sums only. bf16: the error of eager bf16 against float32 math, within a factor 2 (the
    # max error moves with which intermediate a rounding hits: eager rounds after every op, a kernel where it
    # stores or casts), or two bf16 ulps (2**-7) of the largest value
    if dtype == torch.float32:
        tolerance = 1e-5
    else:
        tolerance = max(2.0 ** -7, 2 * max(result[f"eager_max_rel_error_{t}"] for t in token_counts))
    result["tolerance"] = tolerance
    expected = {"qwen3_qk_norm_rope": {"fuse_qk_norm_rope": 2}, "step3_rope": {"fuse_rope": 2},
                "router_renormalize": {"fuse_moe_routing": 1}, "router_logsumexp": {"fuse_moe_routing": 1}}[case]
    if case.startswith("router") and dtype != torch.float32:
        expected = {"fuse_moe_routing": 0}  # a half-precision softmax is left alone (another result)
    result["ok"] = (all(result["passes"].get(k) == v for k, v in expected.items())
                    and not result["codegen_fallbacks"] and not result["kernel_failures"]
                    and max(result[f"max_rel_error_{t}"] for t in token_counts) <= tolerance)
    result["expected"] = expected
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run on Triton's interpreter (small token counts)")
    parser.add_argument("--tokens", default="256,1", help="token counts, the symbolic one (> 1) first")
    args = parser.parse_args()
    token_counts = tuple(int(t) for t in args.tokens.split(","))
    results = []
    for case in ("qwen3_qk_norm_rope", "step3_rope", "router_renormalize", "router_logsumexp"):
        for dtype in (torch.bfloat16, torch.float32):
            try:
                results.append(run_case(case, dtype, args.device, token_counts))
            except Exception as error:  # noqa: BLE001  (one failing case must not hide the others' figures)
                results.append({"case": case, "dtype": str(dtype), "ok": False, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(results[-1])[:400], flush=True)
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
               "triton": __import__("triton").__version__, "all_ok": all(r["ok"] for r in results), "results": results}
    with open(args.out, "w") as sink:
        json.dump(summary, sink, indent=2)
    print("all_ok", summary["all_ok"])


if __name__ == "__main__":
    main()
