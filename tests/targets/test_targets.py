"""Targets: found through the entry-point group, data that lowering reads, chosen with a reason."""

from __future__ import annotations

from importlib import metadata

import pytest

from flagtree_py.options import CompileOptions
from flagtree_py.targets import get_target, registered_targets, select_target


def test_in_tree_targets_come_from_the_entry_point_group():
    names = {entry.name for entry in metadata.entry_points(group="flagtree.targets")}
    assert {"nvidia", "metax", "iluvatar", "interpreter"} <= names
    assert {"nvidia-sm90", "nvidia-sm80", "metax-c500", "iluvatar-bi150", "interpreter"} <= set(registered_targets())


def test_warps_are_counted_in_the_target_warp_size():
    assert get_target("nvidia").num_warps(256) == 8
    assert get_target("metax").num_warps(256) == 4  # 64-thread warps
    assert get_target("iluvatar").num_warps(256) == 4
    assert get_target("metax").warp_size == get_target("iluvatar").warp_size == 64


def test_hash_changes_with_what_changes_code():
    sm90, sm80 = get_target("nvidia-sm90"), get_target("nvidia-sm80")
    assert sm90.hash() == get_target("nvidia").hash()
    assert len({sm90.hash(), sm80.hash(), get_target("metax").hash(), get_target("iluvatar").hash()}) == 4


def test_selection_says_why():
    target, reason = select_target("metax", "cuda")
    assert target.name == "metax-c500" and "requested" in reason
    target, reason = select_target("auto", "cpu")
    assert target.name == "interpreter" and "cpu" in reason


def test_environment_default_is_read_once_into_options(monkeypatch):
    monkeypatch.setenv("FLAGTREE_TARGET", "iluvatar")
    assert CompileOptions.from_user(None).target == "iluvatar"
    assert CompileOptions.from_user({"target": "nvidia"}).target == "nvidia"
    with pytest.raises(ValueError, match="unknown flagtree target"):
        CompileOptions.from_user({"target": "tpu"})


def test_decode_split_follows_the_multiprocessors():
    """Decode GEMMs split K until about two programs run per multiprocessor (Qwen3-8B's shapes on
    an H100: the splits its sweep measured best); a target without the figure keeps its table's."""
    from flagtree_py.targets import get_target
    from flagtree_py.targets.base import GemmConfig

    h100 = get_target("nvidia-sm90")
    tile = GemmConfig(16, 64, 128, 128, 4, 4)
    assert h100.decode_split(tile, 4096, 4096) == 4  # o_proj
    assert h100.decode_split(tile, 4096, 12288) == 4  # down
    assert h100.decode_split(tile, 6144, 4096) == 2  # qkv
    assert h100.decode_split(GemmConfig(16, 32, 128, 128, 4, 4), 12288, 4096) == 1  # gate_up: 384 programs
    assert h100.decode_split(tile, 64, 256) == 2  # never more slices than K has blocks
    assert get_target("interpreter").decode_split(GemmConfig(16, 32, 16, 128, 1, 2), 40, 50) == 2
