"""K = 1 matmuls (transformers' rotary angles) become broadcast multiplies inside the cos/sin kernels."""

from __future__ import annotations

import torch

import flagtree_py


def _compile(fn, dynamic):
    return torch.compile(fn, backend="flagtree", dynamic=dynamic, options={"target": "interpreter", "cache": False})


def test_rotary_angles_bmm_is_a_multiply_in_the_cos_sin_kernels():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))

    def angles(positions):  # transformers' rotary embedding, as Qwen3 writes it
        inv = inv_freq[None, :, None].float().expand(positions.shape[0], -1, 1)
        freqs = (inv @ positions[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb * 1.0, emb.cos(), emb.sin()

    compiled = _compile(angles, dynamic=True)
    for length in (5, 9):
        positions = torch.arange(length).expand(2, -1) + 3
        got, want = compiled(positions), angles(positions)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # one product per element, as cuBLAS's
        for a, b in zip(got[1:], want[1:]):  # numpy's cos/sin and ATen's differ by an ulp here and there
            torch.testing.assert_close(a, b)
    record = flagtree_py.report()[-1]
    assert record["passes"]["decompose_rank1_matmul"] == 1
    assert not any("bmm" in op for op in record["extern_ops"]), record["extern_ops"]


def test_mm_with_k_one_and_a_real_contraction_are_told_apart():
    def fn(a, b, c):
        return a @ b, a @ c  # [M, 1] @ [1, N]: an outer product; [M, 1] @ [1, N] too, c is 2-D [1, 3]

    a, b, c = torch.randn(4, 1), torch.randn(1, 6), torch.randn(1, 3)
    for got, want in zip(_compile(fn, dynamic=False)(a, b, c), fn(a, b, c)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert flagtree_py.report()[-1]["passes"]["decompose_rank1_matmul"] == 2

    def contraction(a, b):
        return a @ b

    x, y = torch.randn(4, 3), torch.randn(3, 5)
    torch.testing.assert_close(_compile(contraction, dynamic=False)(x, y), contraction(x, y))
    assert flagtree_py.report()[-1]["passes"].get("decompose_rank1_matmul", 0) == 0
