"""KernelCache's management methods (listing, removal, LRU eviction, bundles), on small fake entries
written by `store()`: no compilation, so these run in milliseconds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from flagtree_py.cache import KernelCache
from flagtree_py.cache.store import CacheRefused

KEYS = ["aa11" + "0" * 28, "bb22" + "0" * 28, "cc33" + "0" * 28]


def _source(key: str) -> str:
    return f"# module of {key}\ndef call(args):\n    return ()\n"


def _store(cache: KernelCache, key: str, last_used: float | None = None, padding: int = 0) -> Path:
    entry = cache.store(key, _source(key) + "#" * padding, {"graph": f"graph_{key[:2]}", "target": "interpreter"})
    assert entry is not None
    if last_used is not None:  # meta.json is not hashed: usage bookkeeping may change it
        meta = json.loads((entry.path / "meta.json").read_text())
        (entry.path / "meta.json").write_text(json.dumps({**meta, "last_used": last_used}))
    return entry.path


def _size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.iterdir())


@pytest.fixture
def cache(tmp_path) -> KernelCache:
    return KernelCache(tmp_path / "cache")


def test_entries_lists_intact_and_damaged_entries_with_their_sizes(cache):
    paths = [_store(cache, key) for key in KEYS]
    (paths[1] / "meta.json").write_text("{not json")
    (cache.directory / "aa" / ".tmp-1234-scratch").mkdir()  # a write in progress is not an entry
    (cache.directory / "aa" / "notakey").mkdir()
    listed = {entry.key: (entry, size) for entry, size in cache.entries()}
    assert sorted(listed) == KEYS
    assert listed[KEYS[0]][0].meta["graph"] == "graph_aa" and listed[KEYS[0]][0].meta["key"] == KEYS[0]
    assert listed[KEYS[1]][0].meta == {}  # damaged, still listed
    for key, path in zip(KEYS, paths):
        assert listed[key][1] == _size(path) > 0
    assert cache.size_bytes() == sum(_size(path) for path in paths)


def test_missing_directory_has_no_entries_and_is_not_created(tmp_path):
    cache = KernelCache(tmp_path / "absent")
    assert list(cache.entries()) == [] and cache.size_bytes() == 0 and cache.evict(0) == []
    assert not (tmp_path / "absent").exists()


def test_remove(cache):
    path = _store(cache, KEYS[0])
    _store(cache, KEYS[1])
    assert cache.remove(KEYS[0]) is True
    assert not path.exists() and not list(path.parent.glob(".tmp*"))
    assert cache.remove(KEYS[0]) is False
    assert [entry.key for entry, _ in cache.entries()] == [KEYS[1]]
    with pytest.raises(ValueError):
        cache.remove("../" + KEYS[1])


def test_evict_removes_least_recently_used_down_to_the_limit(cache):
    # last used: KEYS[1] longest ago, then KEYS[0], KEYS[2] most recently
    paths = {key: _store(cache, key, last_used=used, padding=1000) for key, used in zip(KEYS, (200.0, 100.0, 300.0))}
    sizes = {key: _size(path) for key, path in paths.items()}
    total = sum(sizes.values())
    assert cache.evict(total) == []  # already within the limit
    assert cache.evict(total - 1) == [KEYS[1]]  # one byte over: the least recently used goes
    assert cache.size_bytes() == total - sizes[KEYS[1]]
    assert cache.evict(sizes[KEYS[2]]) == [KEYS[0]]  # the most recently used one fits and stays
    assert [entry.key for entry, _ in cache.entries()] == [KEYS[2]]
    assert cache.evict(0) == [KEYS[2]] and cache.size_bytes() == 0


def test_evict_takes_a_damaged_entry_first(cache):
    _store(cache, KEYS[0], last_used=1.0)
    damaged = _store(cache, KEYS[1], last_used=500.0)
    (damaged / "meta.json").write_text("")
    assert cache.evict(cache.size_bytes() - 1) == [KEYS[1]]


def test_export_import_round_trip(cache, tmp_path):
    for key in KEYS[:2]:
        _store(cache, key)
    cache.load(KEYS[0])  # one hit here: the importing cache starts its own count
    bundle = tmp_path / "bundle.tar.gz"
    assert cache.export_bundle(bundle, KEYS[:2]) == {KEYS[0]: None, KEYS[1]: None}
    with tarfile.open(bundle) as archive:
        assert sorted(archive.getnames()) == sorted(f"{k}/{n}" for k in KEYS[:2] for n in ("meta.json", "module.py"))
    other = KernelCache(tmp_path / "other")
    assert other.import_bundle(bundle) == [(KEYS[0], "imported", None), (KEYS[1], "imported", None)]
    for key in KEYS[:2]:
        assert other.verify(key) is None
        entry, problem = other.load(key)
        assert problem is None and entry.module_source == _source(key)
        assert entry.meta["graph"] == f"graph_{key[:2]}" and entry.meta["hits"] == 1
    # an intact entry is never overwritten; a damaged one is replaced
    (other.entry_path(KEYS[1]) / "module.py").write_text("raise SystemExit(13)\n")
    outcomes = other.import_bundle(bundle)
    assert outcomes == [(KEYS[0], "kept", "an intact entry is already in the cache"), (KEYS[1], "imported", None)]
    assert other.entry_path(KEYS[0]).joinpath("meta.json").read_text().count('"hits": 1') == 1
    assert other.verify(KEYS[1]) is None
    assert not list(other.directory.glob("*/.tmp*"))


def test_export_leaves_out_a_damaged_entry(cache, tmp_path):
    _store(cache, KEYS[0])
    damaged = _store(cache, KEYS[1])
    (damaged / "module.py").write_text("tampered\n")
    bundle = tmp_path / "bundle.tar.gz"
    assert cache.export_bundle(bundle, KEYS[:2]) == {KEYS[0]: None, KEYS[1]: "module.py does not match its hash"}
    with tarfile.open(bundle) as archive:
        assert all(name.startswith(KEYS[0]) for name in archive.getnames())


def _bundle(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _exported(cache: KernelCache) -> dict[str, bytes]:
    _store(cache, KEYS[0])
    path = cache.entry_path(KEYS[0])
    return {name: (path / name).read_bytes() for name in ("meta.json", "module.py")}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda files: files.update({"module.py": b"import os; os.system('echo owned')\n"}),
         "module.py does not match its hash"),
        (lambda files: files.pop("module.py"), "module.py is missing"),
        (lambda files: files.update({"extra.py": b"x = 1\n"}), "extra.py not listed in meta.json"),
        (lambda files: files.pop("meta.json"), "no meta.json"),
        (lambda files: files.update({"meta.json": json.dumps({**json.loads(files["meta.json"]), "key": KEYS[1]})
                                     .encode()}), f"meta.json belongs to key {KEYS[1]}"),
    ],
)
def test_import_refuses_an_entry_that_fails_its_check(cache, tmp_path, change, problem):
    files = _exported(cache)
    change(files)
    bundle = _bundle(tmp_path / "tampered.tar.gz", [(tarfile.TarInfo(f"{KEYS[0]}/{name}"), data)
                                                      for name, data in files.items()])
    other = KernelCache(tmp_path / "other")
    assert other.import_bundle(bundle) == [(KEYS[0], "refused", problem)]
    assert list(other.entries()) == []


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        ((tarfile.TarInfo("/tmp/flagtree-escape/module.py"), b"x"), "unsafe path"),
        ((tarfile.TarInfo(f"{KEYS[1]}/../../escape.py"), b"x"), "unsafe path"),
        ((tarfile.TarInfo("../escape.py"), b"x"), "unsafe path"),
        ((_link(f"{KEYS[1]}/module.py", tarfile.SYMTYPE, "/etc/passwd"), None), "link or special file"),
        ((_link(f"{KEYS[1]}/module.py", tarfile.LNKTYPE, f"{KEYS[0]}/module.py"), None), "link or special file"),
        ((tarfile.TarInfo(f"{KEYS[1]}/sub/module.py"), b"x"), "unexpected member"),
        ((tarfile.TarInfo("notakey/module.py"), b"x"), "unexpected member"),
        ((tarfile.TarInfo(f"{KEYS[1]}/.hidden"), b"x"), "unexpected file name"),
    ],
)
def test_import_refuses_a_bundle_with_an_unsafe_member(cache, tmp_path, member, problem):
    files = _exported(cache)
    good = [(tarfile.TarInfo(f"{KEYS[0]}/{name}"), data) for name, data in files.items()]
    bundle = _bundle(tmp_path / "unsafe.tar.gz", [*good, member])
    other = KernelCache(tmp_path / "other")
    with pytest.raises(CacheRefused, match=problem):
        other.import_bundle(bundle)
    assert not other.directory.exists()  # nothing written, not even the intact entry
    assert not (tmp_path / "escape.py").exists()


def test_import_refuses_what_is_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(CacheRefused, match="not a readable .tar.gz bundle"):
        KernelCache(tmp_path / "cache").import_bundle(junk)
