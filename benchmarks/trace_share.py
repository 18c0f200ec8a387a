"""torch's own share of a cold compile, apart from any backend: Dynamo's trace and AOTAutograd's capture of a
36-layer transformers Qwen3 decode step (static cache, batch 1) at small widths, with a backend that compiles
nothing (AOTAutograd with flagtree's decompositions, then the aten graph as it is).

    python benchmarks/trace_share.py --device cuda --out trace_share.json

Tracing costs the same at any width (checked on the CPU machine: 12 layers at Qwen3-8B's widths and at 256
wide both took 3.7 s), so this measures how fast a host traces: run it on the same machine, right before
decode.py, to tell a slow host from a slow compile. `--nested` also measures the layers marked as
`torch.compiler.nested_compile_region` (one subgraph traced once by AOTAutograd where torch supports it).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path


def child(nested: bool, device: str, layers: int) -> dict:
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    from flagtree_py.decompositions import flagtree_decompositions
    from flagtree_py.models import build_model, real_config

    if nested:
        import transformers.models.qwen3.modeling_qwen3 as qwen3

        qwen3.Qwen3DecoderLayer.forward = torch.compiler.nested_compile_region(qwen3.Qwen3DecoderLayer.forward)
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import Decoder

    config = real_config("qwen3")
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 256, 512, 4
    config.num_key_value_heads, config.head_dim, config.vocab_size = 2, 64, 1000
    lm = build_model(config, dtype=torch.bfloat16, device=device, num_layers=layers, seed=0).causal_lm
    decoder = Decoder(lm, 1, 64, device)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    positions = torch.full((1, 1), 10, device=device)
    out: dict = {"nested": nested, "layers": layers}

    def backend(gm, inputs):
        began = time.perf_counter()

        def forward_compiler(aten_gm, aten_inputs):
            out["aot_capture_s"] = round(time.perf_counter() - began, 3)
            out["aten_ops"] = collections.Counter(str(n.target) for n in aten_gm.graph.nodes
                                                  if n.op == "call_function").most_common(4)
            return make_boxed_func(aten_gm.forward)

        compiled = aot_module_simplified(gm, inputs, fw_compiler=forward_compiler,
                                         decompositions=flagtree_decompositions(), keep_inference_input_mutations=True)
        out["dynamo_nodes"] = len(gm.graph.nodes)
        return compiled

    step = torch.compile(decoder.forward, backend=backend)
    with torch.no_grad():
        expected = decoder.forward(ids, positions).float()
        began = time.perf_counter()
        got = step(ids, positions).float()
        out["first_call_s"] = round(time.perf_counter() - began, 3)
    out["max_abs_error"] = float((got - expected).abs().max())
    from torch._dynamo.utils import compile_times

    seconds = {k: round(float(v), 3) for k, v in zip(*compile_times(repr="csv", aggregate=True))}
    out["dynamo_trace_s"] = round(seconds["_compile.compile_inner"] - seconds["OutputGraph.call_user_compiler"], 3)
    out["compile_times"] = {k: v for k, v in seconds.items() if v >= 0.05}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--nested", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--child", choices=["plain", "nested"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "nested", args.device, args.layers)))
        return
    import torch

    result = {"torch": torch.__version__, "device": args.device, "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for kind in ["plain"] + (["nested"] if args.nested else []):  # each in a fresh process: a cold compile
        done = subprocess.run([sys.executable, __file__, "--child", kind, "--device", args.device,
                               "--layers", str(args.layers)], capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        result["runs"][kind] = (json.loads(lines[-1]) if done.returncode == 0 and lines
                                else {"error": done.stderr[-3000:]})
        print(f"trace_share: {kind}: {json.dumps(result['runs'][kind])[:400]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
