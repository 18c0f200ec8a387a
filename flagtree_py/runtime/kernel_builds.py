"""Build one kernel binary the way Triton's JIT would, in a process of its own: the worker of
`parallel_builds.py`, and the source description `runtime/aot.py` loads JIT binaries with.

This module imports nothing but the standard library at the top, and Triton where it builds: a worker
process runs it (`python -m flagtree_py.runtime.kernel_builds JOB_DIR`), starting in a fraction of a
second where a process importing torch would take seconds.

A job directory holds `job.json`: the kernel function's name, its source (the `@triton.jit` function,
which uses only `triton` and `tl`) and the file and line it was read from, its launch signature
(runtime/aot.py `launch_signature`), the specialization Triton's JIT will choose for the launch
(`jit_specialization`) and the GPU's compute capability. The worker writes `kernel.cubin`, `kernel.ptx`
and `kernel.json` (Triton's launch metadata) beside it, and `result.json` (what became of the kernel's
launcher, `prepare_launcher`, and the seconds each step took), or exits 1 with the error on stderr.
"""

from __future__ import annotations

import inspect
import json
import linecache
import sys
import time
from pathlib import Path

#: the attribute Triton's NVIDIA backend derives from a "D" specialization (`BaseBackend.parse_attr`)
DIVISIBILITY = ["tt.divisibility", 16]


def jit_source(fn, signature: dict, specialization: tuple | list):
    """Triton's ASTSource as its JIT makes it for a launch of this specialization, and the compile options:
    the launcher Triton builds from it takes the same arguments, in the same order, as the JIT's own launch."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    names = list(inspect.signature(fn).parameters)
    types, constants, attrs = {}, {}, {}
    for index, (name, built) in enumerate(zip(names, specialization)):
        kind, _, flag = built.partition(":")
        types[name] = kind
        if kind == "constexpr":
            constants[name] = int(flag)
        elif flag == "D":
            attrs[(index,)] = [list(DIVISIBILITY)]
    meta = dict(signature["meta"])
    options = {"num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 3)}
    for name, value in meta.items():
        types[name] = "constexpr"
        constants[name] = value
    return ASTSource(fn=JITFunction(fn), signature=types, constexprs=constants, attrs=attrs), options


def binary_files(compiled) -> dict[str, bytes]:
    """A CompiledKernel's cubin, PTX and launch metadata (Triton's own json) by file extension."""
    metadata = next(Path(path) for name, path in compiled.metadata_group.items() if name.endswith(".json"))
    return {"cubin": bytes(compiled.asm["cubin"]), "ptx": compiled.asm["ptx"].encode(), "json": metadata.read_bytes()}


def write_job(directory: Path, function: str, source: str, origin: tuple[str, int], signature: dict, specialization,
              capability: int) -> None:
    """The job a worker builds (`build_job`): `function` is the name `source` defines, `origin` the file and
    line it was read from."""
    directory.mkdir(parents=True, exist_ok=True)
    job = {"function": function, "source": source, "origin": list(origin), "signature": signature,
           "specialization": list(specialization), "capability": capability}
    (directory / "job.json").write_text(json.dumps(job))


def build_job(directory: Path):
    """Build the job in `directory` for its sm_<capability> (Triton's CompiledKernel): Triton compiles for an
    explicit target, so no GPU is needed.

    The kernel is defined at its own file name and line (Triton's JIT reads a kernel's source through
    `inspect`, which finds it in `linecache`), so the binary's line table names the generated module, as
    the JIT's own build does: the two are the same bytes, and a profiler maps both to the module's lines.
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    job = json.loads((directory / "job.json").read_text())
    filename, line = job["origin"]
    text = "\n" * (line - 1) + job["source"]
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    namespace = {"__name__": f"flagtree_build_{directory.name}", "triton": triton, "tl": tl}
    exec(compile(text, filename, "exec"), namespace)  # noqa: S102 -- the generated kernel, as its module runs it
    kernel = namespace[job["function"]]
    source, options = jit_source(kernel.fn, job["signature"], job["specialization"])
    return triton.compile(source, target=GPUTarget("cuda", job["capability"], 32), options=options)


def prepare_launcher(compiled) -> str:
    """Build the host-side launcher Triton makes for a kernel at its first launch, where it compiles one.

    Triton 3.6 (and before) writes a C launcher per kernel signature and builds it with the host's C
    compiler, a fraction of a second to a second each, cached in Triton's cache directory: built here, the
    kernel's first launch in the parent finds it there. Triton 3.9 launches every kernel through one generic
    launcher: nothing to build. What happened, in a word (the parent counts them)."""
    from triton.backends.nvidia import driver

    if not hasattr(driver, "make_launcher"):
        return "generic"
    # the driver's own C module (CudaUtils) is not needed to build a launcher: the parent builds that one
    driver.CudaLauncher(compiled.src, compiled.metadata)
    return "built"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m flagtree_py.runtime.kernel_builds JOB_DIR", file=sys.stderr)
        return 2
    directory = Path(argv[1])
    began = time.perf_counter()
    compiled = build_job(directory)
    for kind, data in binary_files(compiled).items():
        (directory / f"kernel.{kind}").write_bytes(data)
    built = time.perf_counter()
    try:
        launcher = prepare_launcher(compiled)
    except Exception as error:  # noqa: BLE001 -- no C compiler, no libcuda (a CPU machine): the launch builds it
        launcher = f"not built ({type(error).__name__}: {str(error)[:200]})"
    result = {"launcher": launcher, "compile_s": round(built - began, 3),
              "launcher_s": round(time.perf_counter() - built, 3)}
    (directory / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
