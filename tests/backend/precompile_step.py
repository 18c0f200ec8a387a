"""A tiny Qwen3 decode step (static KV cache) served by `flagtree_py.precompile.precompiled`; run as a script
by test_precompile.py in a fresh process: `python precompile_step.py ARTIFACT CACHE_DIR` prints one JSON line."""

from __future__ import annotations

import json
import sys
import time

import torch


class Step:
    """One decode step over one static cache, as a serving loop holds it (a bound method is what it compiles;
    torch saves guards on module-level classes only)."""

    def __init__(self, lm, cache, mask_length: int | None = None) -> None:
        self.lm, self.cache, self.mask_length = lm, cache, mask_length

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.mask_length is not None:  # the length recipe's mask (flagtree_py/models/dynamic_length.py)
            from flagtree_py.models.dynamic_length import static_cache_mask

            mask = static_cache_mask(positions, self.mask_length)
        return self.lm(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=self.cache,
                       use_cache=True).logits


def decode_steps(artifact: str, cache_dir: str, steps: int = 3) -> dict:
    """`steps` greedy decode steps through the precompiled step and through eager, from one prefilled cache."""
    from transformers import StaticCache

    import flagtree_py
    from flagtree_py.models import build_model, tiny_config
    from flagtree_py.precompile import precompiled

    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lm = build_model(tiny_config("qwen3"), dtype=torch.float32, device="cpu", seed=0).causal_lm
    generator = torch.Generator().manual_seed(1)
    context = torch.randint(0, lm.config.vocab_size, (1, 6), generator=generator)
    caches = {name: StaticCache(config=lm.config, max_cache_len=16) for name in ("eager", "flagtree")}

    def step(cache, ids, positions):
        return Step(lm, cache).forward(ids, positions)

    logits, tokens, first_call_s = {name: [] for name in caches}, {}, None
    with torch.no_grad():
        for name, cache in caches.items():
            out = step(cache, context, torch.arange(6)[None])  # eager prefill for both
            tokens[name] = out[:, -1:].argmax(-1)
        ids, positions = tokens["flagtree"], torch.tensor([[6]])
        started = time.perf_counter()
        served = precompiled(Step(lm, caches["flagtree"]).forward, (ids, positions), artifact,
                             options={"target": "interpreter", "cache_dir": cache_dir})
        for i in range(steps):
            positions = torch.tensor([[6 + i]])
            out = served(tokens["flagtree"], positions)
            if first_call_s is None:
                first_call_s = time.perf_counter() - started
            logits["flagtree"].append(out)
            logits["eager"].append(step(caches["eager"], tokens["eager"], positions))
            tokens = {name: logits[name][-1][:, -1:].argmax(-1) for name in caches}
    error = max((a - b).abs().max().item() for a, b in zip(logits["flagtree"], logits["eager"]))
    records = flagtree_py.report()
    return {"source": served.source, "max_abs_error": error, "first_call_s": first_call_s,
            "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
            "fallback_calls": served.fallback_calls,
            "records": [{key: r.get(key) for key in ("cache", "cache_path", "link")} for r in records]}


if __name__ == "__main__":
    # imported, not run as __main__: the guards saved by the test's process name the class precompile_step.Step
    from precompile_step import decode_steps as imported_decode_steps

    print(json.dumps(imported_decode_steps(sys.argv[1], sys.argv[2])))
