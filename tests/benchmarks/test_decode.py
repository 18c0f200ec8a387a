"""benchmarks/decode.py --smoke: the whole-model decode benchmark's script runs end to end on tiny shapes on
the CPU (the real run is the lead's, on an H100). Not a timing test: only the figures' presence and the
correctness facts (flagtree's agreement with eager, cache hit in the warm process) are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


@pytest.mark.slow
def test_decode_smoke(tmp_path):
    out = tmp_path / "decode.json"
    environment = {k: v for k, v in os.environ.items() if k not in ("FLAGTREE_TARGET", "FLAGTREE_DUMP_DIR")}
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--modes", "eager,flagtree", "--lengths", "1,2,5", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=environment, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["model"], report["layers"], report["batches"], report["dtype"]) == ("qwen3", 2, [1, 2], "float32")
    later = {"flagtree-warm", "flagtree-precompile", "flagtree-precompiled"}
    assert set(report["modes"]) == {"eager", "flagtree"} | later
    assert report["copy_bandwidth_gb_s"] > 0 and all(v > 0 for v in report["roofline_ms"].values())
    for name, mode in report["modes"].items():
        assert "error" not in mode, mode
        batches = ["1"] if name in later else ["1", "2"]
        assert sorted(mode["batches"]) == batches
        for batch, entry in mode["batches"].items():
            assert "error" not in entry, entry.get("traceback")
            assert entry["ms_per_step"] > 0 and entry["first_call_s"] > 0
            # tiny shapes in Triton's interpreter are far from any roofline: only the arithmetic is checked
            assert entry["roofline_percent"] == round(100 * report["roofline_ms"][batch] / entry["ms_per_step"], 1)
    cold, warm = report["modes"]["flagtree"], report["modes"]["flagtree-warm"]
    for batch in ("1", "2"):  # decode: one graph per batch size, compiled by flagtree, no graph break
        facts = cold["batches"][batch]["flagtree"]
        assert cold["batches"][batch]["dynamo_graphs"] == 1 and facts["graphs"] == 1
        assert facts["graph_fallbacks"] == [] and facts["triton_kernels"] > 0
    assert cold["batches"]["1"]["flagtree"]["cache"] == ["miss"]
    assert warm["batches"]["1"]["flagtree"]["cache"] == ["hit"]
    # precompiled: saved by one process (Dynamo traces, flagtree's cache hits), loaded by the next with no trace
    saved = report["modes"]["flagtree-precompile"]["batches"]["1"]
    loaded = report["modes"]["flagtree-precompiled"]["batches"]["1"]
    assert saved["precompiled_source"] == "compiled" and saved["dynamo_graphs"] == 1 and saved["precompile_s"] > 0
    assert saved["flagtree"]["cache"] == ["hit"]
    assert loaded["precompiled_source"] == "loaded" and loaded["load_s"] > 0
    assert loaded["dynamo_graphs"] == 0 and loaded["fallback_calls"] == 0
    assert loaded["flagtree"]["cache"] == ["hit"] and loaded["flagtree"]["graph_fallbacks"] == []
    agreement = cold["agreement"]
    assert agreement["positions"] == 2 * 4 and agreement["top1_agreement"] == 1.0
    assert agreement["dynamo_graphs_compiled"] == 0  # the timed step's graph served it
    assert agreement["max_rel_logit_error"] < 1e-5  # float32: summation order only
    margin = agreement["margin_aware"]  # float32: eager is its own reference; every position is clear of ties
    assert margin["reference"] == "eager (the float32 model itself)" and margin["min_margin"] == 0
    assert margin["positions"] == margin["positions_kept"] == 2 * 4
    assert margin["top1_vs_reference"] == {"eager": 1.0, "compiled": 1.0} and margin["top1_agreement_kept"] == 1.0
    recompiles = cold["recompiles"]
    assert recompiles["layers"] == 1 and recompiles["lengths"] == [1, 2, 5]
    # the one-graph caller (flagtree_py/models/dynamic_length.py): length 1's graph serves 2, 5 and decode
    assert recompiles["recompiles"] == 0 and recompiles["new_graph_at_lengths"] == [1]
    assert recompiles["dynamo_graphs"] == recompiles["flagtree_graphs"] == 1 and recompiles["graph_breaks"] == {}
    assert recompiles["dynamic_symbols"] and recompiles["shape_guards_added"] == []
    assert [e["new_graphs"] for e in recompiles["per_length"]] == [1, 0, 0] and recompiles["decode"]["new_graphs"] == 0
    plain = recompiles["plain_call"]  # transformers' own masks and attention: length 1 traced apart
    assert plain["new_graph_at_lengths"][:2] == [1, 2] and plain["recompiles"] == len(plain["new_graph_at_lengths"]) - 1
