"""Links from a Dynamo graph's key to the aten entry its compile made: `<cache>/links/<key[:2]>/<key>.json`.

A warm start used to run AOTAutograd (tens of seconds for a 36-layer model) only to compute the key of an
entry it then imported. A link lets backend.py find that entry from the Dynamo graph itself
(`cache/key.py` `dynamo_graph_key`) and skip AOTAutograd. It is written only at a cold compile whose
AOTAutograd capture needed no runtime wrapper work flagtree does not redo (dynamo_link.py
`why_not_linkable`) and added no guard, and it holds what the hit needs instead of the aten graph
(dynamo_link.py `write_link`):

    {"aten_key": ..., "graph": name, "inputs": n, "mutated": [input positions the graph writes],
     "symbolic": [[input, dim or null], ...], "mutated_seen_by_autograd": [...], "written": [...]}

A link holds no code. A missing, unreadable or stale one (its entry evicted, damaged, or of another
version) costs a full compile, never a wrong result: the hit path checks the entry like any other.
Links are small and not exported in bundles (`flagtree cache export`): an imported entry is found by the
full path, which writes the link again.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

LINKS_DIR = "links"
_KEY = re.compile(r"[0-9a-f]{32}")
#: the link format; a link of another version is ignored
LINK_VERSION = 2


class GraphLinks:
    """Dynamo-graph key -> aten entry key (and the hit's metadata), beside a KernelCache's entries."""

    def __init__(self, cache_directory: Path | str) -> None:
        self.directory = Path(cache_directory) / LINKS_DIR

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a link key: {key!r}")
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The link's data, or None when there is none or it is unreadable or of another format."""
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("version") != LINK_VERSION:
            return None
        if not isinstance(data.get("aten_key"), str) or not re.fullmatch(r"[0-9a-f]{4,64}", data["aten_key"]):
            return None
        return data

    def put(self, key: str, data: dict) -> bool:
        """Write the link atomically (a scratch file renamed into place); False when the disk refuses."""
        path = self.path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            scratch.write_text(json.dumps({**data, "version": LINK_VERSION}, indent=1, sort_keys=True))
            os.replace(scratch, path)
            return True
        except OSError:
            return False

    def drop(self, aten_key: str) -> int:
        """Remove the links that lead to `aten_key` (its entry is being removed), and the folders that
        leaves empty; returns how many. A scan: links are few (one per compiled graph) and small."""
        dropped = 0
        if not self.directory.is_dir():
            return 0
        for folder in list(self.directory.iterdir()):
            if not folder.is_dir() or folder.is_symlink():
                continue
            for path in list(folder.glob("*.json")):
                try:
                    if json.loads(path.read_text()).get("aten_key") == aten_key:
                        path.unlink()
                        dropped += 1
                except (OSError, ValueError, AttributeError):
                    continue
            _remove_if_empty(folder)
        _remove_if_empty(self.directory)
        return dropped


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or already gone)
        pass
