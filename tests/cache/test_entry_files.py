"""Files added to an entry after it is stored: binaries per kernel and architecture, named extras."""

from __future__ import annotations

import json

import pytest

from flagtree_py.cache import KernelCache


@pytest.fixture
def cache_with_entry(tmp_path):
    cache = KernelCache(tmp_path / "cache")
    cache.store("abcd1234", "def call(args):\n    return ()\n", {"graph": "g", "target": "nvidia-sm90", "kernels": ["k0"]})
    return cache


def test_binaries_and_extras_are_hashed_verified_and_exported(cache_with_entry, tmp_path):
    cache = cache_with_entry
    signature = {"arguments": [["pointer", "*fp32"], ["int", 7]], "meta": {"XBLOCK": 16, "num_warps": 1}}
    cache.add_binaries("abcd1234", "k0", "sm90", signature, {"cubin": b"\x7fELF...", "ptx": b".version 8.0", "json": b"{}"})
    cache.add_extra("abcd1234", "autotune.json", {"k0": {"BLOCK_M": 64}})
    entry = cache.peek("abcd1234")
    assert set(entry.meta["files"]) == {"module.py", "k0.sm90.cubin", "k0.sm90.ptx", "k0.sm90.json", "extra.autotune.json"}
    ((sig, files),) = entry.binaries("sm90").values()
    assert sig == signature and files["cubin"].read_bytes() == b"\x7fELF..."
    assert entry.binaries("sm80") == {}
    assert json.loads(entry.extra("autotune.json")) == {"k0": {"BLOCK_M": 64}} and entry.extra("nothing") is None
    assert cache.verify("abcd1234") is None

    bundle = tmp_path / "b.tar.gz"
    assert cache.export_bundle(bundle, ["abcd1234"]) == {"abcd1234": None}
    other = KernelCache(tmp_path / "other")
    assert other.import_bundle(bundle) == [("abcd1234", "imported", None)]
    moved = other.peek("abcd1234")
    assert moved.binaries("sm90")["k0"][1]["ptx"].read_bytes() == b".version 8.0"
    assert moved.extra("autotune.json") == entry.extra("autotune.json")

    (entry.path / "k0.sm90.cubin").write_bytes(b"tampered")
    assert cache.verify("abcd1234") == "k0.sm90.cubin does not match its hash"
    assert cache.load("abcd1234") == (None, "k0.sm90.cubin does not match its hash")  # never executed


def test_bad_names_and_damaged_entries_are_refused(cache_with_entry):
    cache = cache_with_entry
    with pytest.raises(ValueError, match="bad file name"):
        cache.add_files("abcd1234", {"../escape": b""}, lambda meta: None)
    with pytest.raises(ValueError, match="bad file name"):
        cache.add_extra("abcd1234", "a/b", b"")
    (cache.entry_path("abcd1234") / "module.py").write_text("edited")
    with pytest.raises(ValueError, match="damaged"):
        cache.add_extra("abcd1234", "autotune.json", {})
