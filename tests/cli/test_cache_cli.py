"""`flagtree cache ...` through the command line, on a cache filled by compiling a tiny function in
another process (softmax * 2 on a 4x8 CPU tensor: one reduction kernel, run by Triton's interpreter).

Each test works on its own copy of that cache. A command is a process of its own, as a user runs it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

_COMPILE = """
import json, torch, flagtree_py
f = torch.compile(lambda x: torch.softmax(x, -1) * 2, backend="flagtree")
x = torch.randn(4, 8)
out = f(x)
record = flagtree_py.report()[-1]
print(json.dumps({"cache": record["cache"], "key": record["cache_key"], "kernels": record["triton_kernels"],
                  "err": (out - torch.softmax(x, -1) * 2).abs().max().item()}))
"""
KERNEL = "k0_amax_sub_exp_sum"  # amax, sub, exp, sum, div, mul: the whole graph in one reduction kernel


def _environment(cache_dir: Path) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("FLAGTREE_TARGET", "FLAGTREE_DUMP_DIR")}
    return {**environment, "FLAGTREE_CACHE_DIR": str(cache_dir)}


def _compile(cache_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _COMPILE], check=False, capture_output=True, text=True, timeout=300,
                          env=_environment(cache_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cache_cli(cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`flagtree cache ARGS` with FLAGTREE_CACHE_DIR=cache_dir and stdin not a terminal."""
    return subprocess.run([sys.executable, "-m", "flagtree_py.cli.main", "cache", *args], check=False,
                          capture_output=True, text=True, timeout=120, env=_environment(cache_dir),
                          stdin=subprocess.DEVNULL)


def _json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # the whole of stdout is one document


def _one_line_error(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("compiled") / "cache"
    result = _compile(directory)
    assert result["cache"] == "miss" and result["kernels"] == 1 and result["err"] < 1e-5
    return directory, result["key"]


@pytest.fixture
def entry(compiled, tmp_path) -> tuple[Path, str]:
    """(a cache directory of this test's own holding one entry, its key)"""
    directory, key = compiled
    shutil.copytree(directory, tmp_path / "cache")
    return tmp_path / "cache", key


def _fake_twin(directory: Path, key: str, last_used: float) -> str:
    """Copy the entry under a key sharing its first 8 characters (what a prefix must tell apart)."""
    twin = key[:8] + ("0" if key[8] != "0" else "1") * (len(key) - 8)
    shutil.copytree(directory / key[:2] / key, directory / twin[:2] / twin)
    meta_path = directory / twin[:2] / twin / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "key": twin, "graph": "twin", "last_used": last_used}))
    return twin


def test_ls_json(entry):
    directory, key = entry
    module = directory / key[:2] / key / "module.py"
    listing = _json(cache_cli(directory, "ls", "--json"))
    assert listing["cache_dir"] == str(directory)
    (row,) = listing["entries"]
    assert (row["key"], row["graph"], row["target"]) == (key, "graph_0", "interpreter")
    assert (row["kernels"], row["kernel_names"], row["hits"], row["problem"]) == (1, [KERNEL], 0, None)
    assert row["size"] == module.stat().st_size + module.with_name("meta.json").stat().st_size
    assert 0 <= row["age_s"] < 600 and row["last_used"] >= row["created"]


def test_ls_table_and_cache_dir_option(entry, tmp_path):
    directory, key = entry
    # --cache-dir wins over FLAGTREE_CACHE_DIR (here an empty directory), before or after the action
    result = cache_cli(tmp_path / "empty", "--cache-dir", str(directory), "ls")
    assert result.returncode == 0, result.stderr
    header, rule, row, *rest = result.stdout.splitlines()
    assert header.split() == ["key", "graph", "target", "kernels", "size", "age", "used", "hits", "check"]
    assert set(rule) == {"-", " "}
    assert row.split()[:4] == [key[:12], "graph_0", "interpreter", "1"] and row.endswith(" ok")
    assert "KiB" in row and "\x1b" not in result.stdout  # human sizes; no colour off a terminal
    assert rest[-1].startswith("1 entry, ") and rest[-1].endswith(str(directory))
    empty = cache_cli(directory, "ls", "--cache-dir", str(tmp_path / "empty"))
    assert empty.returncode == 0 and empty.stdout.startswith("no entries in")
    assert not (tmp_path / "empty").exists()  # looking creates nothing


def test_ls_sorts_by_last_use_and_prefixes_must_be_unique(entry):
    directory, key = entry
    twin = _fake_twin(directory, key, last_used=4e9)  # used "later" than the real entry
    assert [row["key"] for row in _json(cache_cli(directory, "ls", "--json"))["entries"]] == [twin, key]
    line = _one_line_error(cache_cli(directory, "show", key[:8]), "flagtree cache show: error: ")
    assert f"key prefix '{key[:8]}' is ambiguous" in line and key[:12] in line and twin[:12] in line
    assert _json(cache_cli(directory, "show", key[:9], "--json"))["key"] == key  # one more character decides


def test_show_json(entry):
    directory, key = entry
    module = (directory / key[:2] / key / "module.py").read_bytes()
    shown = _json(cache_cli(directory, "show", key[:6], "--json"))
    assert (shown["key"], shown["graph"], shown["target"], shown["problem"]) == (key, "graph_0", "interpreter", None)
    assert len(shown["target_hash"]) == 16 and shown["files"] == {"module.py": hashlib.sha256(module).hexdigest()}
    assert shown["record"]["passes"]["partition_fusion_groups"] == 1
    assert shown["record"]["passes"]["fuse_rms_norm"] == 0
    (kernel,) = shown["record"]["kernels"]
    assert (kernel["name"], kernel["kind"], kernel["stored"]) == (KERNEL, "reduction", ["mul"])
    assert kernel["nodes"] == ["amax", "sub", "exp", "sum_1", "div", "mul"]
    assert kernel["config"]["RBLOCK"] == 8 and "num_warps" in kernel["config"]  # one block holds a row of 8
    assert shown["partition"].startswith(f"{KERNEL}: shape=('4', '8') rdims=(1,)")


def test_show_text(entry):
    directory, key = entry
    result = cache_cli(directory, "show", key)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"key            {key}  (ok)")
    assert "\ntarget         interpreter  (target hash " in out and "module.py sha256 " in out
    assert "\ncompile        " in out and " s cold" in out and "1 Triton kernel;" in out
    assert "partition_fusion_groups          1" in out
    assert f"\n  {KERNEL}: shape=('4', '8') rdims=(1,) stores=[mul:full]\n      amax sub exp sum_1 div mul" in out
    row = next(line for line in out.splitlines() if line.startswith(f"  {KERNEL}  "))
    assert "reduction" in row and "RBLOCK=8" in row and "num_warps=" in row


def test_show_kernel_prints_its_triton_source_and_launch(entry):
    directory, key = entry
    module = (directory / key[:2] / key / "module.py").read_text()
    result = cache_cli(directory, "show", key[:4], "--kernel", KERNEL)
    assert result.returncode == 0, result.stderr
    comments, source = result.stdout.split("@triton.jit\n", 1)
    source = "@triton.jit\n" + source
    assert f"# {KERNEL}: reduction kernel of group 0" in comments and "# launch config: XBLOCK=" in comments
    assert f"# launched as: run({KERNEL}, (cdiv(4, " in comments
    assert source.startswith(f"@triton.jit\ndef {KERNEL}(in_ptr0, out_ptr0, XBLOCK: tl.constexpr")
    assert source in module  # a verbatim slice of the module...
    assert "tl.store(" in source and "_fallback" not in source and "def call" not in source  # ...of one function
    after = module[module.index(source) + len(source):]
    assert after.lstrip("\n").startswith(f"def {KERNEL}_fallback(")  # it ends where the next definition begins


def test_show_source_and_unknown_kernel(entry):
    directory, key = entry
    module = (directory / key[:2] / key / "module.py").read_text()
    result = cache_cli(directory, "show", key, "--source")
    assert result.returncode == 0 and result.stdout == module  # no highlighting off a terminal
    line = _one_line_error(cache_cli(directory, "show", key, "--kernel", "k9_nope"), "flagtree cache show: error: ")
    assert "no kernel 'k9_nope'" in line and KERNEL in line


def test_stats(entry):
    directory, key = entry
    stats = _json(cache_cli(directory, "--cache-dir", str(directory), "stats", "--json"))
    size = sum(path.stat().st_size for path in (directory / key[:2] / key).iterdir())
    assert (stats["entries"], stats["bytes"], stats["hits"], stats["damaged"]) == (1, size, 0, 0)
    assert stats["targets"] == {"interpreter": 1}
    assert stats["oldest"]["key"] == stats["newest"]["key"] == key
    text = cache_cli(directory, "stats").stdout
    assert f"\nsize       {size / 1024:.1f} KiB ({size} bytes)\n" in text and "\ntargets    interpreter 1" in text


def test_verify_finds_an_edited_module(entry):
    directory, key = entry
    assert _json(cache_cli(directory, "verify", "--json")) == {"cache_dir": str(directory), "checked": 1,
                                                                "problems": []}
    module = directory / key[:2] / key / "module.py"
    module.write_text(module.read_text().replace("def call(args):", "def call(args):\n    raise SystemExit(13)"))
    result = cache_cli(directory, "verify")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"{key}: module.py does not match its hash"
    assert "checked 1 entry: 1 damaged" in result.stdout


def test_rm_by_prefix(entry):
    directory, key = entry
    result = cache_cli(directory, "rm", key[:5])
    assert result.returncode == 0 and result.stdout == f"removed {key} (graph_0, interpreter)\n"
    assert not (directory / key[:2] / key).exists()


def test_clear_asks_for_yes(entry):
    directory, key = entry
    line = _one_line_error(cache_cli(directory, "clear"), "flagtree cache clear: error: ")
    assert "stdin is not a terminal" in line and "--yes" in line
    assert (directory / key[:2] / key).is_dir()  # refused: nothing removed
    result = cache_cli(directory, "clear", "--yes")
    assert result.returncode == 0 and result.stdout.startswith("removed 1 entry from")
    assert not list(directory.glob("*/*"))


def test_export_import_round_trip_is_a_cache_hit(entry, tmp_path):
    directory, key = entry
    bundle = tmp_path / "kernels.tar.gz"
    exported = cache_cli(directory, "export", str(bundle))
    assert exported.returncode == 0 and exported.stdout.startswith(f"exported 1 entry to {bundle}"), exported.stderr
    fresh = tmp_path / "fresh"
    imported = cache_cli(fresh, "import", str(bundle))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines() == [f"imported {key}", f"1 imported, 0 kept, 0 refused into {fresh}"]
    assert _json(cache_cli(fresh, "verify", "--json"))["problems"] == []
    result = _compile(fresh)  # a new process compiling the same function finds it
    assert (result["cache"], result["key"], result["err"] < 1e-5) == ("hit", key, True)


def test_tampered_bundle_is_refused(entry, tmp_path):
    directory, key = entry
    files = {name: (directory / key[:2] / key / name).read_bytes() for name in ("meta.json", "module.py")}
    files["module.py"] = files["module.py"].replace(b"def call(args):", b"def call(args):\n    raise SystemExit(13)")
    bundle, unsafe = tmp_path / "tampered.tar.gz", tmp_path / "unsafe.tar.gz"
    for path, names in ((bundle, {f"{key}/{n}": d for n, d in files.items()}), (unsafe, {"../escape.py": b"x"})):
        with tarfile.open(path, "w:gz") as archive:
            for name, data in names.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    fresh = tmp_path / "fresh"
    result = cache_cli(fresh, "import", str(bundle))
    assert result.returncode == 1
    assert result.stderr == f"flagtree cache import: refused {key}: module.py does not match its hash\n"
    assert result.stdout == f"0 imported, 0 kept, 1 refused into {fresh}\n"
    assert not list(fresh.glob("*/*"))
    result = cache_cli(fresh, "import", str(unsafe))
    assert result.returncode == 1 and "unsafe path '../escape.py'" in result.stderr
    assert not (tmp_path / "escape.py").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "0123456789abcdef"], "flagtree cache show: error: no cache entry '0123456789abcdef' in "),
        (["rm", "abc"], "flagtree cache rm: error: key prefix 'abc' is too short: give at least 4 characters"),
        (["import", "no-such-bundle.tar.gz"], "flagtree cache import: error: no bundle no-such-bundle.tar.gz"),
    ],
)
def test_unknown_keys_are_one_line_errors(entry, args, message):
    _one_line_error(cache_cli(entry[0], *args), message)


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "the following arguments are required: ACTION"), (["ls", "--bogus"], "unrecognized arguments: --bogus"),
     (["show"], "the following arguments are required: KEY")],
)
def test_bad_arguments_exit_2(tmp_path, args, message):
    result = cache_cli(tmp_path, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr.splitlines()[-1]  # argparse's usage line, then its one-line error
