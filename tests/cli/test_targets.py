"""`flagtree targets`, `flagtree --version` and the command line's own errors."""

import dataclasses
import json

import pytest

import flagtree_py
from flagtree_py.cli.main import main
from flagtree_py.cli.targets import describe_differences
from flagtree_py.targets import VENDOR_DEFAULTS, registered_targets
from flagtree_py.targets.nvidia import SM90


def test_table_has_a_row_per_registered_target(run_cli):
    result = run_cli("targets")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    for column in ("name", "vendor", "arch", "warp size", "max threads/block", "shared memory/block",
                   "Triton language", "features"):
        assert column in header
    assert set(lines[1]) == {"-", " "}  # the rule under the header
    specs = registered_targets()
    rows = {line.split()[0]: line.split() for line in lines[2:2 + len(specs)]}
    assert set(rows) == set(specs)
    for name, spec in specs.items():
        # name, vendor, arch, warp size, max threads/block, then shared memory as "<n> <unit>"
        assert rows[name][1:5] == [spec.vendor, spec.arch, str(spec.warp_size), str(spec.max_threads_per_block)]
        assert ".".join(map(str, spec.triton_language)) in rows[name]
    differ = [line for line in lines if line.startswith("How they differ:")]
    assert len(differ) == 1
    assert "warp size 32 (" in differ[0] and " vs 64 (" in differ[0]  # NVIDIA's 32-wide warps vs MetaX/Iluvatar's 64


def test_table_shows_shared_memory_in_binary_units(run_cli):
    result = run_cli("targets")
    row = next(line for line in result.stdout.splitlines() if line.startswith("nvidia-sm90 "))
    assert "227 KiB" in row  # 227 * 1024 bytes, the sm_90 opt-in maximum
    row = next(line for line in result.stdout.splitlines() if line.startswith("metax-c500 "))
    assert "64 KiB" in row and "3.1" in row


def test_json_matches_the_registered_specs(run_cli):
    result = run_cli("targets", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    specs = registered_targets()
    assert {entry["name"] for entry in data["targets"]} == set(specs)
    for entry in data["targets"]:
        spec = specs[entry["name"]]
        assert entry["vendor"] == spec.vendor and entry["arch"] == spec.arch
        assert entry["warp_size"] == spec.warp_size
        assert entry["max_threads_per_block"] == spec.max_threads_per_block
        assert entry["shared_memory_per_block"] == spec.shared_memory_per_block
        assert entry["triton_language"] == ".".join(map(str, spec.triton_language))
        assert entry["features"] == sorted(spec.features) and entry["dtypes"] == sorted(spec.dtypes)
        assert entry["hash"] == spec.hash()
    assert data["vendor_defaults"] == VENDOR_DEFAULTS
    by_name = {entry["name"]: entry for entry in data["targets"]}
    assert by_name["metax-c500"]["warp_size"] == 64 and by_name["metax-c500"]["default_for_vendor"] == "metax"
    assert by_name["nvidia-sm80"]["default_for_vendor"] is None  # nvidia means nvidia-sm90
    assert data["how_they_differ"].startswith("How they differ:")


def test_differences_are_read_from_the_data():
    wide = dataclasses.replace(SM90, name="wide-warp", warp_size=64)
    line = describe_differences([SM90, wide])
    assert "warp size 32 (nvidia-sm90) vs 64 (wide-warp)" in line
    assert "All share max threads/block 1024" in line and "Triton language 3.6" in line
    twin = dataclasses.replace(SM90, name="twin")
    assert describe_differences([SM90, twin]).startswith("How they differ: in name only.")


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"flagtree {flagtree_py.__version__} (torch ")


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "required: COMMAND"), (["compile-everything"], "invalid choice"), (["targets", "--yaml"], "unrecognized")],
)
def test_usage_errors_exit_2(run_cli, args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr.splitlines()[-1]


def test_main_returns_exit_status_in_process(capsys):
    assert main(["targets", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"]
    assert main(["--version"]) == 0  # argparse's SystemExit becomes the return value
    assert main(["demo", "--tokens", "0"]) == 2


def test_console_script(run_cli, flagtree_script):
    if flagtree_script is None:
        pytest.skip("the `flagtree` console script is not installed (pip install -e .)")
    result = run_cli("targets", script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("name")
    assert run_cli("--version", script=True).stdout.startswith("flagtree ")
