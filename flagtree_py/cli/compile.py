"""`flagtree compile MODEL --target T`: compile a model's graphs into the cache on any machine, no GPU needed.

    flagtree compile qwen3 --tiny --target nvidia        sm_90 and sm_80 entries, each with cubin + PTX
    flagtree compile qwen3 --tiny --target metax          Triton source and launch metadata
    flagtree compile /path/to/model --target iluvatar     a local Hugging Face model folder (config.json)

The graphs are traced on fake CUDA tensors, so the entries have the keys a run on the GPU computes with
the same toolchain (see flagtree_py/ahead_of_time.py). Progress goes to stderr; the result to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from flagtree_py.cli.common import Progress, error, format_table

#: `--target nvidia` builds for both NVIDIA architectures flagtree has targets for
TARGET_GROUPS = {"nvidia": ["nvidia-sm90", "nvidia-sm80"]}
DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile", help="compile a model's graphs for a target into the cache (no GPU needed)",
        description=__doc__.split("\n\n", 2)[2].replace("\n", " "),
        epilog="exit status: 0 success, 1 a graph failed to compile, 2 bad input")
    parser.add_argument("model", metavar="MODEL", help="a preset (qwen3, qwen3-30b-a3b, step3, ...) or a model folder")
    parser.add_argument("--target", required=True, metavar="TARGET",
                        help="nvidia (sm_90 and sm_80), nvidia-sm90, nvidia-sm80, metax, iluvatar or a target name")
    parser.add_argument("--tiny", action="store_true", help="the preset's tiny configuration (2 layers, small shapes)")
    parser.add_argument("--layers", type=int, metavar="N", help="keep only N decoder layers")
    parser.add_argument("--length", type=int, default=7, metavar="L", help="prompt length to trace with (default 7)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--dynamic", action="store_true", help="compile with symbolic sizes (torch.compile dynamic=True)")
    parser.add_argument("--cache-dir", metavar="DIR", help="the cache directory (overrides FLAGTREE_CACHE_DIR)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.set_defaults(run=run, prog=parser.prog)


def run(args: argparse.Namespace) -> int:
    from flagtree_py.targets import get_target

    targets = TARGET_GROUPS.get(args.target, [args.target])
    try:
        targets = [get_target(name).name for name in targets]
    except ValueError as problem:
        return error(args.prog, str(problem))
    if args.length < 1:
        return error(args.prog, f"--length must be at least 1, got {args.length}")
    try:
        build, vocab = _model_builder(args)
    except (ValueError, OSError) as problem:
        return error(args.prog, str(problem).splitlines()[0])
    from flagtree_py.ahead_of_time import compile_ahead
    from flagtree_py.cache import default_cache_dir

    cache_dir = Path(args.cache_dir or os.environ.get("FLAGTREE_CACHE_DIR") or default_cache_dir())
    progress = Progress(args.prog)
    summaries, start = [], time.perf_counter()
    for target in targets:
        progress.note(f"compiling {args.model}{' (tiny)' if args.tiny else ''} for {target}")
        try:
            summaries += compile_ahead(build, vocab, args.length, target, cache_dir,
                                       dynamic=True if args.dynamic else None, note=progress.note)
        except Exception as problem:  # noqa: BLE001 -- a compiler failure: one line, not a traceback
            print(f"{args.prog}: {target}: {type(problem).__name__}: {str(problem).splitlines()[0] if str(problem) else ''}",
                  file=__import__("sys").stderr)
            return 1
    document = {"model": args.model, "tiny": args.tiny, "cache_dir": str(cache_dir), "entries": summaries,
                "triton_compiles": sum(s["triton_compiles"] for s in summaries),
                "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    rows = [[s["key"][:12], s["graph"], s["target"], s["kernels"],
             ", ".join(f"{arch} x{len(names)}" for arch, names in s["binaries"].items()) or "-", s["cache"]]
            for s in summaries]
    print(format_table(["key", "graph", "target", "kernels", "binaries", "cache"], rows))
    print(f"\n{len(summaries)} entries in {cache_dir}; {document['triton_compiles']} Triton compiles in "
          f"{document['seconds']} s (`flagtree cache show KEY` lists them)")
    return 0


def _model_builder(args: argparse.Namespace):
    """(a function building the model on the meta device, its vocabulary size); ValueError if unknown."""
    import torch

    from flagtree_py.models import build_model, get_preset, real_config, tiny_config
    from flagtree_py.models.presets import UnknownPresetError

    dtype = getattr(torch, args.dtype)
    folder = Path(args.model)
    if folder.is_dir():
        if args.tiny:
            raise ValueError("--tiny needs a preset name, not a model folder")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    else:
        try:
            preset = get_preset(args.model)
        except UnknownPresetError as problem:
            raise ValueError(str(problem)) from None
        config = tiny_config(preset.name) if args.tiny else real_config(preset.name)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 256)

    def build():
        return build_model(config, dtype=dtype, device="meta", num_layers=args.layers)

    return build, vocab
