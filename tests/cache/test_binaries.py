"""Kernel binaries by content (cache/binaries.py): the key, verify and tamper, bundles, lookup from another
graph entry, and a Triton version that did not build a binary never loads it."""

from __future__ import annotations

import sys
import tarfile

import pytest
import torch

import flagtree_py
from flagtree_py.cache import KernelCache
from flagtree_py.cache.binaries import BinaryStore, binary_key, kernel_source
from flagtree_py.runtime import launch
from flagtree_py.runtime.aot import ContentBinaries, binary_files, compile_for_nvidia
from flagtree_py.runtime.launch import GuardedKernel, counters

_SIGNATURE = {"arguments": [("pointer", "*fp32"), ("pointer", "*fp32"), ("int", 37)],
              "meta": {"XBLOCK": 64, "num_warps": 2}}
_SOURCE = "@triton.jit\ndef k(in_ptr0, out_ptr0, xnumel, XBLOCK: tl.constexpr):\n    pass\n"
_FILES = {"cubin": b"\x7fELF fake cubin", "ptx": b"// fake ptx", "json": b'{"name": "k"}'}


def _key(**changes) -> str:
    values = {"source": _SOURCE, "signature": _SIGNATURE, "arch": "sm90", "triton_version": "3.6.0"} | changes
    return binary_key(values["source"], values["signature"], values["arch"], values["triton_version"])


def test_content_key_is_stable_and_holds_what_the_binary_depends_on():
    assert _key() == _key() and len(_key()) == 64
    # another size of the same width is the same binary (sizes are never specialized on)
    assert _key(signature={**_SIGNATURE, "arguments": [*_SIGNATURE["arguments"][:2], ("int", 5000)]}) == _key()
    # Triton's defaults written out are the same launch
    assert _key(signature={**_SIGNATURE, "meta": {**_SIGNATURE["meta"], "num_stages": 3}}) == _key()
    different = [
        _key(signature={**_SIGNATURE, "arguments": [*_SIGNATURE["arguments"][:2], ("int", 2**40)]}),  # i64
        _key(signature={**_SIGNATURE, "arguments": [("pointer", "*bf16"), *_SIGNATURE["arguments"][1:]]}),
        _key(signature={**_SIGNATURE, "meta": {"XBLOCK": 128, "num_warps": 2}}),
        _key(signature={**_SIGNATURE, "meta": {"XBLOCK": 64, "num_warps": 4}}),
        _key(source=_SOURCE.replace("pass", "return")),
        _key(arch="sm80"),
        _key(triton_version="3.9.0"),
    ]
    assert len(set(different) | {_key()}) == len(different) + 1


def test_a_jit_builds_specialization_is_part_of_its_key():
    def keyed(specialization):
        return binary_key(_SOURCE, _SIGNATURE, "sm90", "3.6.0", specialization)

    # no specialization (an ahead-of-time build): the key is what it always was, so `flagtree compile`'s
    # binaries keep being found
    assert keyed(None) == _key()
    aligned = ("*fp32:D", "*fp32:D", "i32")
    keys = {keyed(aligned), keyed(("*fp32", "*fp32:D", "i32")), keyed(("*fp32:D", "*fp32:D", "i32:D")),
            keyed(("*fp32:D", "*fp32:D", "constexpr:1")), _key()}
    assert len(keys) == 5 and keyed(list(aligned)) == keyed(aligned)


def test_put_degrades_to_nothing_stored_where_it_cannot_write(tmp_path):
    (tmp_path / "binaries").write_text("not a directory")  # mkdir fails, as on a read-only or full disk
    assert BinaryStore(tmp_path).put(_key(), "k", "sm90", "3.6.0", _SIGNATURE, _FILES) is None
    assert BinaryStore(tmp_path).get(_key()) is None and list(BinaryStore(tmp_path).entries()) == []


def _commented(in_ptr0, xnumel, XBLOCK: int):
    # computes: add_3, mul_7 (node names another torch may number differently)
    x = in_ptr0 + xnumel  # a trailing comment

    return x


def _plain(in_ptr0, xnumel, XBLOCK: int):
    x = in_ptr0 + xnumel
    return x


def _other(in_ptr0, xnumel, XBLOCK: int):
    x = in_ptr0 - xnumel
    return x


def test_kernel_source_leaves_comments_out_of_the_key_but_not_code():
    def keyed(fn):
        return binary_key(kernel_source(fn).replace(fn.__name__, "k"), _SIGNATURE, "sm90", "3.6.0")

    assert "computes" not in kernel_source(_commented) and "<indent>" in kernel_source(_plain)
    assert keyed(_commented) == keyed(_plain) != keyed(_other)


def test_put_get_verify_and_tamper(tmp_path):
    store = BinaryStore(tmp_path)
    key = _key()
    assert store.get(key) is None
    store.put(key, "k", "sm90", "3.6.0", _SIGNATURE, _FILES)
    signature, files = store.get(key)
    assert signature == _SIGNATURE and {kind: path.read_bytes() for kind, path in files.items()} == _FILES
    assert store.verify(key) is None
    (meta, size, problem), = list(store.entries())
    assert meta["kernel"] == "k" and meta["triton"] == "3.6.0" and problem is None and size > 0
    files["cubin"].write_bytes(b"\x7fELF tampered")
    assert store.verify(key) == "kernel.cubin does not match its hash" and store.get(key) is None
    assert store.put(key, "k", "sm90", "3.6.0", _SIGNATURE, _FILES) is not None  # a damaged one is replaced
    assert store.verify(key) is None and store.get(key)[1]["cubin"].read_bytes() == _FILES["cubin"]
    with pytest.raises(ValueError):
        store.path("../escape")


def test_binaries_travel_in_bundles_and_a_tampered_one_is_refused(tmp_path):
    key = _key()
    BinaryStore(tmp_path / "a").put(key, "k", "sm90", "3.6.0", _SIGNATURE, _FILES)
    bundle = tmp_path / "b.tar.gz"
    problems = KernelCache(tmp_path / "a").export_bundle(bundle, [], [key])
    assert problems == {f"binaries/{key}": None}
    outcomes = KernelCache(tmp_path / "b").import_bundle(bundle)
    assert outcomes == [(f"binaries/{key}", "imported", None)]
    assert BinaryStore(tmp_path / "b").get(key)[0] == _SIGNATURE
    assert KernelCache(tmp_path / "b").import_bundle(bundle)[0][1] == "kept"
    # a bundle whose cubin was changed after export: refused, nothing written
    tampered = tmp_path / "t.tar.gz"
    with tarfile.open(bundle) as source, tarfile.open(tampered, "w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".cubin"):
                data, member.size = data[:-2] + b"!!", len(data)
            target.addfile(member, __import__("io").BytesIO(data))
    (outcome,) = KernelCache(tmp_path / "c").import_bundle(tampered)
    assert outcome[1] == "refused" and "hash" in outcome[2]
    assert BinaryStore(tmp_path / "c").get(key) is None


def _kernel(options: dict):
    """The one kernel of a small graph compiled for NVIDIA (run by the interpreter here), and its args."""
    torch._dynamo.reset()
    flagtree_py.clear_report()
    f = torch.compile(lambda x: x.sin() * 2 + 1, backend="flagtree", options={"target": "nvidia", **options})
    x = torch.randn(37)
    torch.testing.assert_close(f(x), x.sin() * 2 + 1)
    (record,) = flagtree_py.report()
    module = sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]
    (kernel,) = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    return record, kernel


@pytest.mark.slow
def test_binary_found_by_content_from_another_graph_entry_and_not_by_another_triton(tmp_path):
    import triton

    # "machine A": a graph entry, and its kernel built for sm_90 into the content store
    first, built = _kernel({"cache_dir": str(tmp_path / "cache")})
    compiled = compile_for_nvidia(built.kernel.fn, built.signature, 90)
    key = binary_key(kernel_source(built.kernel.fn), built.signature, "sm90", triton.__version__)
    BinaryStore(tmp_path / "cache").put(key, built.name, "sm90", triton.__version__, built.signature,
                                        binary_files(compiled))
    # "machine B": the same kernels under another graph key (here: another options hash)
    second, kernel = _kernel({"cache_dir": str(tmp_path / "cache"), "poison_outputs": True})
    assert second["cache_key"] != first["cache_key"] and second["cache"] == "miss"
    args = tuple(torch.empty(37) if kind == "pointer" else value for kind, value in kernel.signature["arguments"])
    found = ContentBinaries(tmp_path / "cache", "sm90")
    binary = found.find(kernel.name, kernel.kernel.fn, args, kernel.signature["meta"])
    assert binary is not None and bytes(binary.compiled.asm["cubin"]) == bytes(compiled.asm["cubin"])
    (lookup,) = found.lookups.values()
    assert lookup == {"kernel": kernel.name, "key": key, "found": True}
    # another launch shape (XBLOCK) is another binary: not found
    assert found.find(kernel.name, kernel.kernel.fn, args, {**kernel.signature["meta"], "XBLOCK": 8}) is None
    # the same kernel on a machine whose Triton is another version: never reused
    other = ContentBinaries(tmp_path / "cache", "sm90")
    other.triton_version = "3.6.0" if triton.__version__ != "3.6.0" else "3.9.0"
    assert other.find(kernel.name, kernel.kernel.fn, args, kernel.signature["meta"]) is None
    assert [v["found"] for v in other.lookups.values()] == [False]
    # and another architecture neither
    assert ContentBinaries(tmp_path / "cache", "sm80").find(kernel.name, kernel.kernel.fn, args,
                                                            kernel.signature["meta"]) is None


def test_guarded_kernel_launches_a_binary_found_by_content_before_any_jit():
    launched = []

    class Binary:
        def launch(self, grid, args, meta):
            launched.append((grid, args, meta))

    class Found:
        def find(self, name, fn, args, meta):
            return Binary() if meta["XBLOCK"] == 16 else None

    class Jit:
        fn = None

        def __getitem__(self, grid):
            def jit(*args, **meta):
                launched.append(("jit", meta))
            return jit

    kernel = GuardedKernel("k", Jit(), lambda *a: None, interpreted=False, content_binaries=Found())
    before = dict(counters)
    launch.run(kernel, (3,), 4, XBLOCK=16, num_warps=2)
    assert launched == [((3,), (4,), {"XBLOCK": 16, "num_warps": 2})]
    assert counters["content_binary_launches"] == before.get("content_binary_launches", 0) + 1
    assert counters["binary_launches"] == before.get("binary_launches", 0) + 1
    launch.run(kernel, (3,), 4, XBLOCK=32, num_warps=2)  # not in the store: Triton's JIT takes it
    assert launched[-1] == ("jit", {"XBLOCK": 32, "num_warps": 2})
