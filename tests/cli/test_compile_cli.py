"""`flagtree compile`: graphs traced on fake CUDA tensors into the cache, cubins for NVIDIA, per-target output."""

from __future__ import annotations

import json
import re

import pytest


def _compile(run_cli, cache_dir, target, *more):
    done = run_cli("compile", "qwen3", "--tiny", "--target", target, "--cache-dir", str(cache_dir), "--json", *more,
                   timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiling qwen3 (tiny) for " in done.stderr  # progress on stderr
    return json.loads(done.stdout)


def _show(run_cli, cache_dir, key):
    done = run_cli("cache", "--cache-dir", str(cache_dir), "show", key, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_nvidia_sm90_entry_holds_cubins_and_travels_in_a_bundle(run_cli, tmp_path):
    result = _compile(run_cli, tmp_path / "cache", "nvidia-sm90")
    (entry,) = result["entries"]
    assert entry["target"] == "nvidia-sm90" and entry["kernels"] == entry["launched"] > 0
    assert len(entry["binaries"]["sm90"]) == entry["kernels"]
    # groups of the same structure (one per layer) launch one kernel (codegen/share_kernels.py); kernels of
    # other groups that still come out identical but for their name (a GEMM's split-K partial sums, whatever
    # its epilogue) share one build by content
    distinct = len(set(entry["binaries_by_content"].values()))
    assert entry["triton_compiles"] == result["triton_compiles"] == distinct <= entry["kernels"]
    meta = _show(run_cli, tmp_path / "cache", entry["key"])
    assert meta["problem"] is None and "cuda" in meta["aten_graph"]  # traced as a GPU run would be
    for kernel, per_arch in meta["binaries"].items():
        files = per_arch["sm90"]["files"]
        assert set(files) == {"cubin", "ptx", "json"} and all(name in meta["files"] for name in files.values())
        assert per_arch["sm90"]["signature"] == meta["launches"][kernel]
    text = run_cli("cache", "--cache-dir", str(tmp_path / "cache"), "show", entry["key"]).stdout
    assert "binaries (built ahead of time" in text and ".sm90.cubin" in text
    # the same builds by content (cache/binaries.py): what a GPU with another torch finds
    listed = json.loads(run_cli("cache", "--cache-dir", str(tmp_path / "cache"), "ls", "--json").stdout)
    by_content = {row["key"]: row for row in listed["binaries"]}
    assert set(entry["binaries_by_content"]) == set(entry["binaries"]["sm90"])
    assert set(entry["binaries_by_content"].values()) <= set(by_content)
    assert all(row["arch"] == "sm90" and row["problem"] is None for row in by_content.values())
    stats = json.loads(run_cli("cache", "--cache-dir", str(tmp_path / "cache"), "stats", "--json").stdout)
    assert stats["binaries"] == len(by_content) > 0

    # a second compile finds the entry and builds nothing
    again = _compile(run_cli, tmp_path / "cache", "nvidia-sm90")
    assert again["entries"][0]["cache"] == "hit" and again["triton_compiles"] == 0

    # export / import carry the binaries, verified; a tampered cubin is found by verify
    bundle = tmp_path / "b.tar.gz"
    assert run_cli("cache", "--cache-dir", str(tmp_path / "cache"), "export", str(bundle)).returncode == 0
    assert run_cli("cache", "--cache-dir", str(tmp_path / "other"), "import", str(bundle)).returncode == 0
    moved = _show(run_cli, tmp_path / "other", entry["key"])
    assert moved["problem"] is None and moved["binaries"] == meta["binaries"]
    moved_listed = json.loads(run_cli("cache", "--cache-dir", str(tmp_path / "other"), "ls", "--json").stdout)
    assert {row["key"] for row in moved_listed["binaries"]} == set(by_content)
    cubin = next(iter(moved["binaries"].values()))["sm90"]["files"]["cubin"]
    path = tmp_path / "other" / entry["key"][:2] / entry["key"] / cubin
    path.write_bytes(path.read_bytes()[:-8])
    verify = run_cli("cache", "--cache-dir", str(tmp_path / "other"), "verify")
    assert verify.returncode == 1 and f"{cubin} does not match its hash" in verify.stdout


@pytest.mark.slow
def test_metax_and_iluvatar_outputs_differ_from_nvidia_where_the_targets_differ(run_cli, tmp_path):
    entries = {}
    for target in ("nvidia-sm90", "metax", "iluvatar"):
        (entry,) = _compile(run_cli, tmp_path, target, "--length", "5")["entries"]
        entries[target] = (entry, _show(run_cli, tmp_path, entry["key"]))
    keys = {entry["key"] for entry, _ in entries.values()}
    assert len(keys) == 3
    nvidia = entries["nvidia-sm90"][1]
    for vendor in ("metax", "iluvatar"):
        entry, meta = entries[vendor]
        assert entry["binaries"] == {} and "no ahead-of-time compiler" in entry["note"] and "binaries" not in meta
        # the same kernels, launched differently; a decode GEMM is the split-K pair where K is split
        # (the table's SPLIT_K here) and one tiled kernel where NVIDIA's multiprocessors ask for no split
        assert _gemm_groups(meta["launches"]) == _gemm_groups(nvidia["launches"])
        warps = {name: (sig["meta"]["num_warps"], nvidia["launches"][name]["meta"]["num_warps"])
                 for name, sig in meta["launches"].items() if name in nvidia["launches"]}
        # 64-wide warps: never more warps than NVIDIA's for the same kernel, strictly fewer somewhere
        assert all(theirs <= ours for theirs, ours in warps.values())
        assert any(theirs < ours for theirs, ours in warps.values())
        assert meta["target"] == {"metax": "metax-c500", "iluvatar": "iluvatar-bi150"}[vendor]
        assert meta["target_hash"] != nvidia["target_hash"]


def test_bad_input_is_a_one_line_error(run_cli, tmp_path):
    for args, message in [
        (("compile", "no-such-model", "--tiny", "--target", "metax"), "no-such-model"),
        (("compile", "qwen3", "--tiny", "--target", "tpu"), "unknown flagtree target 'tpu'"),
        (("compile", "qwen3", "--tiny", "--target", "metax", "--length", "0"), "--length must be at least 1"),
        (("compile", "qwen3"), "the following arguments are required: --target"),
    ]:
        done = run_cli(*args, "--cache-dir", str(tmp_path)) if "--target" in args else run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("flagtree compile: error: ") and message in lines[-1], done.stderr
        if "--target" in args:  # the command's own errors: one line (argparse's also print the usage)
            assert len(lines) == 1, done.stderr


def _gemm_groups(names) -> set:
    return {re.sub(r"_(partial|reduce)$", "", name) for name in names}
