"""A KV-cache write becomes in place again: `copy_(cache, index_put(cache, idx, new))` -> `index_put_`.

AOTAutograd functionalizes the cache update of a static KV cache (StaticCache's `index_copy_`, or
`cache[:, :, pos] = new`) into an out-of-place `index_put` (a full copy of the cache) followed, at
the end of the graph, by `copy_` back into the cache input (a second full copy). For decode that
is most of the memory traffic besides the weights. When the cache is read by nothing else, the
in-place write is exact: the attention that read the functional result reads the cache itself.
"""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.passes import PassContext

aten = torch.ops.aten
_IN_PLACE = {aten.index_put.default: aten.index_put_.default, aten.index_copy.default: aten.index_copy_.default}


def reinplace_cache_writes(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    rewritten = 0
    for copy in list(graph.nodes):
        if copy.op != "call_function" or copy.target != aten.copy_.default:
            continue
        cache, update = copy.args[:2]
        if not isinstance(update, torch.fx.Node) or update.target not in _IN_PLACE or update.args[0] is not cache:
            continue
        if cache.op != "placeholder" or set(cache.users) != {update, copy}:
            continue  # another reader of the cache would depend on where the write lands
        cache_val, update_val = cache.meta["val"], update.meta["val"]
        if cache_val.shape != update_val.shape or cache_val.dtype != update_val.dtype:
            continue
        with graph.inserting_before(update):
            in_place = graph.call_function(_IN_PLACE[update.target], update.args, dict(update.kwargs))
        in_place.meta["val"] = cache_val  # the op returns the cache itself
        graph.erase_node(copy)
        update.replace_all_uses_with(in_place)
        graph.erase_node(update)
        rewritten += 1
    ctx.counters["reinplace_cache_writes"] += rewritten
    return rewritten > 0
