"""Compile a tiny Qwen3 with a dump directory, then show what flagtree generated.

    python examples/inspect_kernels.py [DUMP_DIR]        (default: ./flagtree_dump)

`options={"dump_dir": ...}` writes, per compiled graph, the aten graph flagtree received
(`<graph>.aten.txt`), its fusion groups (`<graph>.partition.txt`) and the generated Python module
(Triton kernels, their aten fallbacks and the `call(args)` wrapper). This prints the module's path
and the source of its largest kernel.
"""

import ast
import sys
from pathlib import Path

import torch

import flagtree_py
from flagtree_py.models import build_tiny_model


def kernel_source(module_path: Path, kernel_name: str) -> str:
    """The source of one `@triton.jit` function of a generated module, decorator included."""
    text = module_path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == kernel_name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(text.splitlines()[first - 1:node.end_lineno])
    raise LookupError(f"{kernel_name} not found in {module_path}")


def main() -> None:
    dump_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "flagtree_dump").resolve()
    model = build_tiny_model("qwen3")
    compiled = torch.compile(model, backend="flagtree", dynamic=True, options={"dump_dir": str(dump_dir)})
    input_ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compiled(input_ids)

    record = flagtree_py.report()[-1]
    print(f"target: {record['target']} ({record['target_reason']})")
    print(f"generated module: {record['module_path']}")
    print(f"dump directory {dump_dir}:")
    for path in sorted(dump_dir.iterdir()):
        print(f"  {path.name}")
    print(f"{record['triton_kernels']} Triton kernels; extern ops: {sorted(set(record['extern_ops']))}")

    kernel = max(record["kernels"], key=lambda k: len(k["nodes"]))  # the biggest fusion
    print(f"\n{kernel['name']}: {kernel['kind']} kernel, launch config {kernel['config']}")
    print(f"fuses: {', '.join(kernel['nodes'])}")
    print(f"stores: {', '.join(kernel['stored'])}\n")
    print(kernel_source(Path(record["module_path"]), kernel["name"]))


if __name__ == "__main__":
    main()
