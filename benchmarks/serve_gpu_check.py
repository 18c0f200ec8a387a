"""`flagtree serve <preset> --tiny` on an NVIDIA GPU: does vLLM's CUDA path come up with flagtree compiling?

    python benchmarks/serve_gpu_check.py --out serve_gpu.json [--presets qwen3 step3] [--tokens 64]

Needs the stock `vllm` package (CUDA) and `openai` in the same environment as flagtree; where vLLM cannot be
imported it writes {"skipped": "..."} and exits 0, so the lead can run it on any machine. Per preset it
starts `flagtree serve` (CUDA platform wrapped by flagtree's plugin; vLLM's piecewise split at attention and
its CUDA graphs stay on), waits for /health, sends a greedy chat completion, a streamed one and a plain
completion, times a decode of --tokens tokens, reads flagtree's report (graphs, Triton kernels, fallbacks,
extern ops, pass counters), then stops the server by its PID. Not a timed test: figures for the lead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(process: subprocess.Popen, port: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"flagtree serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"no /health after {timeout_s} s")


def check_preset(preset: str, tokens: int, workdir: Path, startup_s: float) -> dict:
    import openai

    port = free_port()
    report = workdir / f"{preset}.report.json"
    log = workdir / f"{preset}.log"
    command = [sys.executable, "-m", "flagtree_py.cli.main", "serve", preset, "--tiny", "--port", str(port),
               "--report", str(report), "--", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
    env = dict(os.environ, FLAGTREE_CACHE_DIR=str(workdir / "cache"), PYTHONUNBUFFERED="1")
    result: dict = {"preset": preset, "command": " ".join(command[1:])}
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        result["startup_s"] = round(wait_healthy(process, port, startup_s), 1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Hello"}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
        result["chat_matches_stream"] = streamed == chat.choices[0].message.content
        start = time.perf_counter()
        completion = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
        elapsed = time.perf_counter() - start
        result["decode_tokens"] = completion.usage.completion_tokens
        result["decode_tokens_per_s"] = round(completion.usage.completion_tokens / elapsed, 1)
        data = json.loads(report.read_text())
        result["flagtree"] = data["summary"]
        result["kernel_failures"] = [f for r in data["records"] for f in r.get("kernel_failures", [])]
        result["codegen_fallbacks"] = [f for r in data["records"] for f in r.get("codegen_fallbacks", [])]
        result["ok"] = (data["summary"]["graphs"] > 0 and data["summary"]["triton_kernels"] > 0
                        and data["summary"]["graphs_fallen_back"] == 0 and not result["kernel_failures"])
    except Exception as error:  # noqa: BLE001 (recorded for the lead, with the log's tail)
        result["ok"] = False
        result["error"] = f"{type(error).__name__}: {error}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        result["log_tail"] = log.read_text()[-4000:] if not result.get("ok") else ""
        result["flagtree_log_lines"] = [line for line in log.read_text().splitlines() if line.startswith("flagtree")]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--presets", nargs="+", default=["qwen3", "qwen3-30b-a3b", "step3"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--startup-s", type=float, default=900)
    args = parser.parse_args()

    missing = [name for name in ("vllm", "openai") if importlib.util.find_spec(name) is None]
    if missing:
        output = {"skipped": f"not importable here: {', '.join(missing)} (pip install vllm openai)"}
    else:
        import torch

        with tempfile.TemporaryDirectory(prefix="flagtree-serve-gpu-") as scratch:
            output = {
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
                "torch": torch.__version__,
                "results": [check_preset(p, args.tokens, Path(scratch), args.startup_s) for p in args.presets],
            }
    Path(args.out).write_text(json.dumps(output, indent=1))
    print(json.dumps({k: v for k, v in output.items() if k != "results"} | {
        "ok": [r["preset"] for r in output.get("results", []) if r.get("ok")]}))


if __name__ == "__main__":
    main()
