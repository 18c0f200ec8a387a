"""What flagtree changes in vLLM's native platforms: the compiler behind vLLM's piecewise compilation.

vLLM takes a custom compiler only from the platform: with `compilation_config.backend` set to anything but
"inductor"/"eager", `make_compiler` instantiates `current_platform.get_compile_backend()`, a
`CompilerInterface` qualname. Mixed into CpuPlatform and CudaPlatform (cpu_platform.py, cuda_platform.py).

Why the CPU platform needs more than that: `CpuPlatform.check_and_update_config` turns the VLLM_COMPILE mode
into DYNAMO_TRACE_ONCE and sets the backend to "inductor" ("eager" under VLLM_CPU_CI_ENV), whatever the user
asked, because Inductor's piecewise C++ compiles are slow on CPUs. That would silently replace flagtree.
So after the native hook ran, the mode and backend are put back when the config asked for flagtree: mode
VLLM_COMPILE with the default backend "", which vLLM's CompilationConfig resolves to get_compile_backend()
(it refuses any other custom backend name for piecewise compilation).

Why the CUDA platform needs more: vLLM's IR ops (rms_norm, fused_add_rms_norm) run the PyTorch form only when
Inductor compiles; with any other backend `CudaPlatform.get_default_ir_op_priority` puts vLLM's own CUDA
kernels (`vllm_c`) first, and flagtree would receive `_C.rms_norm` calls instead of the norms it fuses (with
the q/k norm, the rotary embedding after it). flagtree compiles like Inductor: the PyTorch form comes first.
"""

from __future__ import annotations

COMPILER_QUALNAME = "flagtree_py.serve.compiler.FlagtreeCompiler"


class FlagtreePlatformMixin:
    """Goes first in the bases: `class FlagtreeCpuPlatform(FlagtreePlatformMixin, CpuPlatform)`."""

    @classmethod
    def get_compile_backend(cls) -> str:
        return COMPILER_QUALNAME

    @classmethod
    def get_default_ir_op_priority(cls, vllm_config):
        from vllm.config import CompilationMode
        from vllm.config.kernel import IrOpPriorityConfig

        if vllm_config.compilation_config.mode != CompilationMode.VLLM_COMPILE:
            return super().get_default_ir_op_priority(vllm_config)  # nothing compiled: vLLM's kernels
        return IrOpPriorityConfig.with_default(["native"])

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        from vllm.config import CompilationMode

        compilation = vllm_config.compilation_config
        wanted = compilation.mode == CompilationMode.VLLM_COMPILE and compilation.backend == COMPILER_QUALNAME
        super().check_and_update_config(vllm_config)
        if wanted and vllm_config.lora_config is None:  # the CPU platform compiles nothing with LoRA
            compilation.mode = CompilationMode.VLLM_COMPILE
            compilation.backend = COMPILER_QUALNAME
