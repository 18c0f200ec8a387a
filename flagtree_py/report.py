"""`flagtree_py.report()`: one record per graph compiled in this process."""

from __future__ import annotations

import copy
import threading

_LOCK = threading.Lock()
_RECORDS: list[dict] = []


def add_record(record: dict) -> dict:
    with _LOCK:
        _RECORDS.append(record)
    return record


def report() -> list[dict]:
    """A copy of the records: target, triton_kernels, lowered_nodes, extern_ops, passes, compile_s..."""
    with _LOCK:
        return copy.deepcopy(_RECORDS)


def clear_report() -> None:
    with _LOCK:
        _RECORDS.clear()


def update_record(graph: str, fields: dict) -> dict | None:
    """Add fields to the latest record of `graph` (backend.py: what happened after the compile returned);
    returns a copy of the record, None if there is none (e.g. a compile that raised)."""
    with _LOCK:
        for record in reversed(_RECORDS):
            if record.get("graph") == graph:
                record.update(fields)
                return copy.deepcopy({k: v for k, v in record.items() if k != "kernels"})
    return None
