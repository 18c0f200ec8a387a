"""Top-1 agreement that tells a compiler's error from near-tied logits (`flagtree validate`, benchmarks/decode.py).

With random weights (or any model in 16-bit floats) many positions have near-tied logits: eager's own
top-1 margin is often below the logit error that bf16 rounding alone makes, so plain top-1 agreement
between two correct bf16 implementations is well below 100% (H100, Qwen3-8B shapes: flagtree 87.9%,
Inductor 85.3%). Two figures, reported next to the plain one and never replacing it, separate that noise
from a compiler defect:

- against a float32 eager reference, the model's eager run and the compiled run are scored alike: a
  compiler that is as correct as eager agrees with float32 as often as eager does;
- over the positions where the reference's top-1 margin (top-1 minus top-2 logit) exceeds a bound, by
  default twice eager's largest |logit error| against the float32 reference: if compiled and eager each
  stay that close to the reference, no such position can flip, so a disagreement there is a defect.
With a float32 model, eager is the reference (its error is 0, the bound 0: only exact ties are dropped).
"""

from __future__ import annotations

import torch

#: how the default bound is described in reports
DEFAULT_BOUND = "2 x eager's max |logit error| against the float32 reference"


def top1_margins(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit per position ([..., vocab] -> [...]), in float64."""
    top2 = logits.double().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class AgreementTally:
    """Per-position facts of eager, compiled and reference logits, gathered over prompts or decode steps."""

    def __init__(self, reference: str) -> None:
        self.reference = reference  # what the reference is, in words
        self.eager_top1: list[torch.Tensor] = []
        self.compiled_top1: list[torch.Tensor] = []
        self.reference_top1: list[torch.Tensor] = []
        self.reference_margin: list[torch.Tensor] = []
        self.max_error = {"eager": 0.0, "compiled": 0.0}

    def add(self, eager: torch.Tensor, compiled: torch.Tensor, reference: torch.Tensor) -> None:
        """Logits of the same positions, [..., vocab] each (any float dtype)."""
        reference = reference.double()
        vocab = reference.shape[-1]
        for name, logits in (("eager", eager), ("compiled", compiled)):
            error = (logits.double() - reference).abs().max().item() if reference.numel() else 0.0
            self.max_error[name] = max(self.max_error[name], error)
        self.eager_top1.append(eager.reshape(-1, vocab).argmax(-1).cpu())
        self.compiled_top1.append(compiled.reshape(-1, vocab).argmax(-1).cpu())
        self.reference_top1.append(reference.reshape(-1, vocab).argmax(-1).cpu())
        self.reference_margin.append(top1_margins(reference.reshape(-1, vocab)).cpu())

    def summary(self, min_margin: float | None = None) -> dict:
        """The margin-aware figures; `min_margin` None takes the default bound (DEFAULT_BOUND)."""
        eager, compiled = torch.cat(self.eager_top1), torch.cat(self.compiled_top1)
        reference, margin = torch.cat(self.reference_top1), torch.cat(self.reference_margin)
        bound = 2 * self.max_error["eager"] if min_margin is None else float(min_margin)
        kept = margin > bound
        count = int(kept.sum().item())

        def rate(got: torch.Tensor, want: torch.Tensor) -> float | None:
            return (got == want).double().mean().item() if got.numel() else None

        return {
            "reference": self.reference,
            "positions": int(eager.numel()),
            "top1_vs_reference": {"eager": rate(eager, reference), "compiled": rate(compiled, reference)},
            "max_abs_logit_error_vs_reference": dict(self.max_error),
            "min_margin": bound,
            "min_margin_source": DEFAULT_BOUND if min_margin is None else "given (--min-margin)",
            "positions_kept": count,
            "top1_agreement_kept": rate(compiled[kept], eager[kept]),
            "top1_vs_reference_kept": {"eager": rate(eager[kept], reference[kept]),
                                       "compiled": rate(compiled[kept], reference[kept])},
            "reference_margin_quantiles": _quantiles(margin),
        }


def _quantiles(values: torch.Tensor) -> dict:
    if not values.numel():
        return {}
    qs = (0.01, 0.1, 0.5, 0.9)
    found = torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64))
    return {str(q): round(float(v), 5) for q, v in zip(qs, found)}


def format_margin_aware(m: dict) -> list[tuple[str, str]]:
    """(label, text) rows of the table: the two margin-aware figures."""
    vs = m["top1_vs_reference"]
    kept = m["top1_agreement_kept"]
    kept_text = "no position" if kept is None else f"top-1 agreement {kept:.4%}"
    return [
        ("vs float32", (f"top-1 agreement with {m['reference']}: eager {vs['eager']:.4%}, compiled "
                        f"{vs['compiled']:.4%} over {m['positions']} positions")),
        ("clear margins", (f"{kept_text} over the {m['positions_kept']} positions whose reference top-1 margin "
                           f"exceeds {m['min_margin']:.3g} ({m['min_margin_source']})")),
    ]
