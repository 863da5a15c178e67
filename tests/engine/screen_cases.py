"""The pool-size case both vocabulary screens are tested on (test_vocab_screen.py, test_int8_screen.py): a pool's
worth of rows (200 samples x K = 4) over 8192 ids, random rows, rows aimed at pairs of ids a few float32 ulps apart
(near-ties) and at pairs of equal projection rows (exact ties)."""

from __future__ import annotations

import torch

ROWS, VOCAB, WIDTH = 800, 8192, 128


def pool_size_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [800, 128], weight [8192, 128], targets [400]): rows 0-199 aim at near-ties, 200-399 at exact ties (the
    first id of each pair is the target), 400-799 are random."""
    generator = torch.Generator().manual_seed(seed)
    weight = 0.2 * torch.randn(VOCAB, WIDTH, generator=generator)
    x = torch.randn(ROWS, WIDTH, generator=generator)
    pairs = torch.randperm(VOCAB, generator=generator)[:400].view(200, 2).sort(dim=1).values
    near, tied = pairs[:100], pairs[100:]
    weight[near[:, 1]] = weight[near[:, 0]] * (1 + 2**-22) + 1e-7 * torch.randn(100, WIDTH, generator=generator)
    weight[tied[:, 1]] = weight[tied[:, 0]]
    targets = torch.cat([near[:, 0], tied[:, 0]]).repeat_interleave(2)
    x[:400] = 4 * weight[targets] + 0.02 * torch.randn(400, WIDTH, generator=generator)
    return x, weight, targets


def assert_pool_size_ids(ids: torch.Tensor, candidates: torch.Tensor, x, weight, targets) -> None:
    """The screened id is the dense float32 argmax (torch's, first index on ties) wherever the float64 margin between
    the best two ids exceeds what float32 rounding can move (two float32 dot products, each within in * 2^-24 |x| |w|
    of the exact one), and within that margin of the best elsewhere; an exact tie goes to the first id, and keeps
    both ids as candidates."""
    dense = (x @ weight.T).argmax(-1)
    exact = x.double() @ weight.double().T
    top = exact.topk(2, dim=-1).values
    rounding = 2 * WIDTH * 2**-24 * x.double().norm(dim=1) * weight.double().norm(dim=1).max()
    decided = top[:, 0] - top[:, 1] > rounding
    assert decided[400:].float().mean() > 0.95 and not decided[200:400].any()  # the checks below mean something
    assert torch.equal(ids[decided], dense[decided])
    assert torch.equal(ids[decided], exact.argmax(-1)[decided])
    within = exact >= (top[:, 0] - rounding)[:, None]
    assert within.gather(1, ids[:, None]).all()
    assert torch.equal(ids[200:400], targets[200:400])  # the first of two equal rows
    assert (candidates >= 1).all() and (candidates[200:400] >= 2).all()  # a tie keeps both ids
