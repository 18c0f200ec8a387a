"""flagtree behind vLLM: `flagtree serve` starts vLLM's OpenAI-compatible server, and flagtree compiles the model.

The floors (DESIGN.md): cli -> serve -> backend. Nothing in the compiler core imports vLLM; this package
adapts vLLM to flagtree through vLLM's own extension points, never by patching it:

- plugin.py      the `vllm.platform_plugins` entry point: active only in a process `flagtree serve` started
                 (environment variable FLAGTREE_SERVE=1), so installing flagtree never changes a plain vLLM;
- platforms.py   what flagtree changes in a native platform (cpu_platform.py, cuda_platform.py wrap them);
- compiler.py    flagtree's `CompilerInterface` for vLLM's piecewise compilation (graph -> flagtree backend);
- launch.py      the vLLM process: environment and argv, then vLLM's in-process OpenAI server entry point.
"""

#: set by `flagtree serve` for its vLLM process; the platform plugin activates only where it is "1"
ACTIVATE_ENV = "FLAGTREE_SERVE"
#: JSON file where the compiling process writes flagtree's report records (one per compiled graph)
REPORT_ENV = "FLAGTREE_SERVE_REPORT"
#: flagtree compile options for the served model, as JSON (CompileOptions fields)
OPTIONS_ENV = "FLAGTREE_SERVE_OPTIONS"
