"""Compile a tiny Qwen3 with flagtree, compare it with eager PyTorch, and print flagtree's report.

    python examples/compile_qwen3.py [--target auto|interpreter|nvidia|metax|iluvatar]

No weights are downloaded: the model has Qwen3-8B's architecture at a tiny size (2 layers, hidden 128)
with random weights. On a machine without a CUDA GPU the kernels run in Triton's interpreter, which
shows correctness, not speed.
"""

import argparse
import json

import torch

import flagtree_py
from flagtree_py.models import build_tiny_model, greedy_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="auto")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_tiny_model("qwen3").to(device)  # forward(input_ids) -> logits [batch, seq, vocab]
    # No `import` of a backend module is needed for "flagtree": it is registered through an entry point.
    compiled = torch.compile(model, backend="flagtree", dynamic=True, options={"target": args.target})

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator).to(device)
    with torch.no_grad():
        expected = model(input_ids)
        actual = compiled(input_ids)
    print(f"logits {tuple(actual.shape)}, max |compiled - eager| = {(actual - expected).abs().max().item():.3g}")
    # float32 throughout: compiled and eager differ only by the order of float32 sums
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

    # Greedy decoding (no KV cache) reruns the model on longer and longer sequences: dynamic=True lets one
    # compiled graph serve every length.
    prompt = input_ids[:, :8].clone()
    compiled_tokens = greedy_generate(compiled, prompt, new_tokens=6)
    eager_tokens = greedy_generate(model, prompt, new_tokens=6)
    print("greedy tokens, compiled:", compiled_tokens[0, 8:].tolist())
    print("greedy tokens, eager:   ", eager_tokens[0, 8:].tolist())
    print("equal:", torch.equal(compiled_tokens, eager_tokens))

    print("\nflagtree_py.report(): one record per compiled graph")
    for record in flagtree_py.report():
        kernels = record.pop("kernels", [])
        record["kernels"] = [f"{k['name']} ({k['kind']}, {len(k['nodes'])} nodes)" for k in kernels]
        print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
