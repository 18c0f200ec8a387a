"""flagtree: a torch.compile backend for LLM inference (`torch.compile(model, backend="flagtree")`)."""

from flagtree_py.report import clear_report, report

__version__ = "0.1.0"
__all__ = ["report", "clear_report", "__version__"]
