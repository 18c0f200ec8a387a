"""Lower a GEMM fusion group (mm/addmm plus its pointwise epilogue) to flagtree's GEMM template.

codegen/gemm_spec.py reads the group (its operands and its epilogue on the output tile) as a
`GemmSpec`; this module chooses the tiles and the kernels, renders them, and writes their aten twins
and the wrapper's launch lines. The wrapper picks the kernel per call from the row count M
(symbolic: one compile serves all): few rows (decode) run the split-K pair, more the tiled kernel
(up to 128 rows also split K where the target's multiprocessors would otherwise idle). On Hopper more
than 128 rows run `<name>_tma`, which loads its operands through tensor descriptors, where their layout
allows.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from flagtree_py.codegen import indexing
from flagtree_py.codegen.check_kernel import KernelCheckFailed, passing_configs
from flagtree_py.codegen.gemm_spec import GemmEpilogueBuilder, GemmOperands, GemmSpec, gemm_operands
from flagtree_py.codegen.indexing import LoweringError, pexpr
from flagtree_py.targets.base import GEMM_BUCKETS, GemmConfig

#: the split-K sum is elementwise over the tile: one modest shape serves every GEMM
REDUCE_TILE = {"BLOCK_M": 16, "BLOCK_N": 64}
GROUP_M = 8


def bucket_configs(target, spec: GemmSpec, dtype: torch.dtype) -> dict[str, list[dict]]:
    """Launch parameters per M bucket, the heuristic one first: the target's tiles that fit it.

    Decode tiles share one SPLIT_K (the workspace and the reduce kernel depend on it): the
    target's choice for the heuristic tile (`TargetSpec.decode_split`). A decode program reads
    BLOCK_N weight columns per accumulator: with SwiGLU's two, the tile's BLOCK_N is halved so a
    program streams as many weight bytes as in a plain GEMM. A split of 1 needs no partial sums:
    the bucket then runs the tiled kernel (one launch, no workspace) with the decode tiles.
    """
    element = torch.empty((), dtype=dtype).element_size()
    accumulators = len(spec.offsets)
    configs: dict[str, list[dict]] = {}
    for bucket, _ in GEMM_BUCKETS:
        tiles: list[GemmConfig] = target.gemm_candidates(bucket, element, accumulators)
        if bucket == "m16":
            tiles = [replace(t, BLOCK_N=max(16, t.BLOCK_N // accumulators)) for t in tiles]
            split = _bucket_split(target, spec, tiles[0])
            extra = {"SPLIT_K": split} if split > 1 else {"GROUP_M": GROUP_M}
            configs[bucket] = [tile_meta(target, t) | extra for t in tiles]
        elif bucket == "m128" and _few_tiles(target, spec, tiles[0]):
            # up to 128 rows (decode at batch <= 128) is still a weight stream: a narrow N (o_proj, down)
            # leaves most multiprocessors idle and gets split-K as decode does
            split = _bucket_split(target, spec, tiles[0])
            configs[bucket] = [tile_meta(target, t) | {"SPLIT_K": split} for t in tiles]
        else:
            configs[bucket] = [tile_meta(target, t) | {"GROUP_M": GROUP_M} for t in tiles]
        if bucket == "large" and spec.tma_layout:
            for meta, tile in zip(configs[bucket], tiles):
                meta |= {"NUM_SMS": (target.multiprocessors or 0) if tile.persistent else 0,
                         "WARP_SPECIALIZE": tile.warp_specialize and tile.persistent}
    return configs


def _static_n(spec: GemmSpec) -> int | None:
    return int(spec.n_expr) if spec.n_expr is not None and spec.n_expr.is_Integer else None


def _bucket_split(target, spec: GemmSpec, tile: GemmConfig) -> int:
    return target.decode_split(tile, _static_n(spec), spec.k)


def _few_tiles(target, spec: GemmSpec, tile: GemmConfig) -> bool:
    """Whether one row block of `tile` leaves at least half the multiprocessors idle (H100, 32 rows:
    splitting o_proj and down, 64 tiles of 64 columns, saved 10%; qkv's 96 and gate_up's 192 lost)."""
    n = _static_n(spec)
    if target.multiprocessors is None or n is None:
        return False
    return 2 * -(-n // tile.BLOCK_N) <= target.multiprocessors and _bucket_split(target, spec, tile) > 1


def is_split(metas: list[dict]) -> bool:
    """Whether a bucket's launch parameters are the split-K pair's (else the tiled kernel's)."""
    return "SPLIT_K" in metas[0]


def checked_configs(target, source: str, spec: GemmSpec, configs: dict[str, list[dict]], dtype: torch.dtype,
                    reduce_warps: int) -> tuple[dict[str, list[dict]], list[str]]:
    """Each bucket's candidates that pass check_kernel on `target` (the tiled kernel's buckets, the
    split-K partial's, and the reduce kernel's one tile), and the problems of the first that failed.

    A bucket left with no candidate, or a problem of the source itself, raises KernelCheckFailed.
    """
    extra = {"kind": "gemm", "element_bytes": torch.empty((), dtype=dtype).element_size()}
    kept, problems = {}, []
    rendered = {spec.name: spec.tiled, f"{spec.name}_tma": spec.tma, f"{spec.name}_partial": spec.split}
    for bucket, metas in configs.items():
        if not rendered[kernel_of(spec, bucket, metas)]:
            kept[bucket] = metas  # a bucket this graph's M never takes: not rendered, not launched
            continue
        passing, first, source_fault = passing_configs(source, metas, target, extra)
        problems = problems or first
        if source_fault or not passing:
            raise KernelCheckFailed(spec.name, first)
        kept[bucket] = passing
    if spec.split:
        reduce = REDUCE_TILE | {"num_warps": reduce_warps}
        passing, first, _ = passing_configs(source, [reduce], target, {"kind": "pointwise"})
        if not passing:
            raise KernelCheckFailed(f"{spec.name}_reduce", first)
    return kept, problems


def tile_meta(target, tile: GemmConfig) -> dict:
    """A tile as launch meta-parameters: warps in the target's warp size; stages only where pipelined."""
    meta = {"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
            "num_warps": target.num_warps(tile.threads)}
    if tile.num_stages != 1:
        meta["num_stages"] = tile.num_stages
    return meta


def launch_lines(spec: GemmSpec, configs: dict, m: str, n: str, device: str, reduce_warps: int) -> tuple[list, list]:
    """The wrapper's per-call choice of kernel by M bucket, and the kernel names it launches.

    A static M renders only its bucket; a symbolic one renders the `if` chain.
    """
    m_value = int(spec.m_expr) if spec.m_expr.is_Integer else None
    branches = []
    for bucket, limit in GEMM_BUCKETS:
        if m_value is not None:
            chosen = limit is None or m_value <= limit
            if not chosen:
                continue
        branches.append((bucket, limit))
        if m_value is not None:
            break
    spec.split = any(is_split(configs[bucket]) for bucket, _ in branches)
    spec.tma = spec.tma_layout and any(bucket == "large" for bucket, _ in branches)
    spec.persistent = spec.tma and any(meta.get("NUM_SMS") for meta in configs["large"])
    spec.tiled = any(kernel_of(spec, bucket, configs[bucket]) == spec.name for bucket, _ in branches)
    lines, names = [], []
    for position, (bucket, limit) in enumerate(branches):
        body = _bucket_body(spec, bucket, configs[bucket][0], m, n, device, reduce_warps)
        if len(branches) == 1:
            lines += body
            continue
        keyword = "if" if position == 0 else ("else" if limit is None else "elif")
        lines.append(f"{keyword}:" if limit is None else f"{keyword} {m} <= {limit}:")
        lines += ["    " + line for line in body]
    if spec.tiled:
        names.append(spec.name)
    if spec.tma:
        names.append(f"{spec.name}_tma")
    if spec.split:
        names += [f"{spec.name}_partial", f"{spec.name}_reduce"]
    return lines, names


def kernel_of(spec: GemmSpec, bucket: str, metas: list[dict]) -> str:
    """The kernel a bucket launches: the split-K pair's first, the TMA one (Hopper, large), or the tiled."""
    if is_split(metas):
        return f"{spec.name}_partial"
    return f"{spec.name}_tma" if bucket == "large" and spec.tma_layout else spec.name


def _bucket_body(spec: GemmSpec, bucket: str, meta: dict, m: str, n: str, device: str, reduce_warps: int) -> list:
    def keywords(values: dict) -> str:
        return ", ".join(f"{key}={value}" for key, value in values.items())

    if "SPLIT_K" not in meta:
        kernel = kernel_of(spec, bucket, [meta])
        aligned = f"tma=({', '.join(spec.tma_buffers)}), " if kernel.endswith("_tma") else ""
        return [(f"run_gemm({kernel}, {bucket!r}, GemmGrid({m}, {n}), {', '.join(spec.launch_args)}, "
                 f"{aligned}{keywords(meta)})")]
    split = meta["SPLIT_K"]
    shape = f"({split}, {len(spec.offsets)}, {m}, {n})"
    reduce = REDUCE_TILE | {"SPLIT_K": split, "num_warps": reduce_warps}
    return [
        f"{spec.name}_workspace = torch.empty({shape}, dtype=torch.float32, device={device})",
        (f"run_gemm({spec.name}_partial, {bucket!r}, GemmGrid({m}, {n}, {split}), "
         f"{', '.join(spec.partial_launch_args)}, {keywords(meta)})"),
        (f"run({spec.name}_reduce, (cdiv({m}, {reduce['BLOCK_M']}) * cdiv({n}, {reduce['BLOCK_N']}),), "
         f"{spec.name}_workspace, {', '.join(spec.launch_args)}, {keywords(reduce)})"),
    ]


def partial_fallback_source(spec: GemmSpec, gemm: GemmOperands) -> str:
    """The partial kernel's aten twin: the whole product into split 0, zeros in the others, so
    that the reduce kernel (or its own fallback) finishes correctly whichever of them ran."""
    b_val = gemm.b.meta["val"]
    a_ptr, b_ptr = spec.a_ptr, spec.b_ptr
    sizes_a = f"({spec.m}, {spec.k})"
    sizes_b = f"({spec.k}, {pexpr(indexing.as_expr(b_val.shape[1]))})"
    lines = [f"def {spec.name}_partial_fallback({', '.join(spec.partial_arguments)}):",
             f'    """{spec.name}_partial with aten ops: used if the kernel fails to build or run."""',
             f"    a = torch.as_strided({a_ptr}, {sizes_a}, ({spec.stride_am}, {spec.stride_ak}), {spec.a_offset})",
             f"    b = torch.as_strided({b_ptr}, {sizes_b}, ({spec.stride_bk}, {spec.stride_bn}), {spec.b_offset})",
             "    workspace.zero_()"]
    for j, c in enumerate(spec.offsets):
        lines.append(f"    workspace[0, {j}].copy_(torch.mm(a, b[:, {c}:{c} + {spec.n}]))")
    return "\n".join(lines)


def reduce_fallback_source(spec: GemmSpec) -> str:
    return "\n".join([
        f"def {spec.name}_reduce_fallback(workspace, {', '.join(spec.arguments)}):",
        f'    """{spec.name}_reduce with aten ops: the whole group, from the operands."""',
        f"    {spec.name}_fallback({', '.join(spec.arguments)})",
    ])


def lower_gemm_group(writer, group, buffers: dict, views: set, lowerings: dict) -> tuple[str | None, list[str]]:
    """The kernels, aten twins and wrapper lines of one GEMM group (ModuleWriter.lower_group's
    counterpart); a form the template cannot take becomes aten, as other groups do."""
    from flagtree_py.codegen.group_kernels import KernelRecord, render_template

    subgraph, externals = writer._group_subgraph(group, buffers)
    stored = [n for n, _ in group.stores()]
    computes = ", ".join(n.name for n in group.ordered_members() if writer.kinds[n] != "view")
    header = f"# {group.name}: {computes}"
    try:
        gemm = gemm_operands(group.gemm, writer.kinds)
        if gemm is None or gemm.a_base not in buffers or gemm.b_base not in buffers:
            raise LoweringError(f"{group.gemm.name} is not a form the GEMM template takes")
        builder = GemmEpilogueBuilder(group, buffers, lowerings, views, writer.device_type, gemm, writer.target)
        for node in [gemm.a_base, gemm.b_base, *externals]:
            builder.add_input(node, buffers[node])
        builder.symbols |= writer._subgraph_symbols(subgraph)
        index_dtype = "int64" if writer._needs_int64(group) else "int32"
        spec = builder.build(group.name, [], index_dtype)
        dtype = group.gemm.meta["val"].dtype
        configs = bucket_configs(writer.target, spec, dtype)
        device = writer.device(group.gemm.meta["val"].device)
        m, n = writer.expr(spec.m_expr), writer.expr(spec.n_expr)
        reduce_warps = writer.target.num_warps(128)
        launch_lines(spec, configs, m, n, device, reduce_warps)  # which kernels the source holds
        spec.comment = [f"computes: {computes}", f"stores: {', '.join(n.name for n in stored)}",
                        f"accumulators: B columns {', '.join(f'{c}..{c}+N' for c in spec.offsets)}"]
        source = render_template("gemm.py.jinja", writer.target, k=spec)
        configs, problems = checked_configs(writer.target, source, spec, configs, dtype, reduce_warps)
        calls, names = launch_lines(spec, configs, m, n, device, reduce_warps)
    except LoweringError as error:
        writer.out.codegen_fallbacks.append({"group": group.name, "reason": str(error)})
        if isinstance(error, KernelCheckFailed):
            writer.out.kernel_checks.append({"kernel": group.name, "problems": error.problems,
                                             "action": "aten fallback"})
        lines = [header + " (aten: " + str(error).replace("\n", " ")[:120] + ")"]
        return None, lines + [writer.call_line(node) for node in subgraph]
    if problems:
        chosen = {bucket: metas[0] for bucket, metas in configs.items()}
        writer.out.kernel_checks.append({"kernel": group.name, "problems": problems,
                                         "action": f"re-lowered with {chosen}"})
    writer.uses_gemm = True
    writer.out.lowered_nodes += sum(1 for node in group.members if writer.kinds[node] not in ("view", "gemm"))
    sections = [source, writer._fallback_source(spec, subgraph, stored, builder)]
    if spec.tma:  # the same computation: the same aten twin
        sections.append(f"{spec.name}_tma_fallback = {spec.name}_fallback")
    if spec.split:
        sections += [partial_fallback_source(spec, gemm), reduce_fallback_source(spec)]
    tuning: dict[str, dict] = {}
    for bucket, metas in configs.items():
        tuning.setdefault(kernel_of(spec, bucket, metas), {})[bucket] = metas
    tuning = {name: buckets for name, buckets in tuning.items() if name in names}
    sections.append("\n".join(f"{name}_candidates = {value!r}" for name, value in tuning.items()))
    members = [node.name for node in group.ordered_members()]
    for name in names:
        bucket_meta = (tuning.get(name) or {"m16": [REDUCE_TILE]})
        first = next(iter(bucket_meta.values()))[0]
        writer.out.kernels.append(KernelRecord(
            name=name, group_id=group.id, kind="gemm", source=source,
            config={**first, "buckets": sorted(bucket_meta), "index_dtype": index_dtype},
            nodes=members, stored=[node.name for node in stored]))
    call = [header] + [writer.allocation(node) for node in stored] + calls
    return "\n\n\n".join(sections), call
