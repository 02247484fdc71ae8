"""Affinity's `pairs` option (issue 17): image-image and text-text similarity distributions (relational
distillation), each row over the other rows of the global batch, computed by hand."""

from __future__ import annotations

import pytest
import torch
from test_domain_scope import DOMAINS, S_SCALE, T_SCALES, N, _aff_tol, _batch, _ctx, _feats, _hand_affinity, _within

from distill.losses import DistillLoss, LossTermCfg, StepContext
from distill.losses.distributed import StepGather
from distill.losses.terms import Affinity


def _hand_intra(student, teacher, t_scale, rows=range(N), domains=None, kl=False, own=lambda i: i) -> torch.Tensor:
    """Per-row intra affinity over every other global row (of the row's domain): image-image and text-text
    softmaxes, cross-entropy (or KL) of the student's from the teacher's, the two modalities averaged."""
    vals = []
    total = student["image"].shape[0]
    for i in rows:
        cols = [j for j in range(total) if j != own(i) and (domains is None or int(domains[j]) == int(domains[i]))]
        per = []
        for m in ("image", "text"):
            if not cols:
                per.append(torch.tensor(0.0, dtype=torch.float64))
                continue
            p_s = torch.softmax(S_SCALE * student[m][i] @ student[m][cols].T, 0)
            p_t = torch.softmax(t_scale * teacher[m][i] @ teacher[m][cols].T, 0)
            v = -(p_t * p_s.log()).sum()
            per.append(v + (p_t * p_t.log()).sum() if kl else v)
        vals.append((per[0] + per[1]) / 2)
    return torch.stack(vals)


@pytest.mark.parametrize("kl", [False, True])
def test_intra_pairs_equal_the_hand_softmax_over_the_other_rows(kl):
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers)
    got = Affinity(kl=kl, pairs="intra").per_sample(_ctx(out, tb), "a")
    want = _hand_intra(student, teachers["a"], T_SCALES["a"], kl=kl)
    _within(got, want, _aff_tol(want, "a", kl))
    # "both" is the mean of the cross value (unchanged default) and the intra value
    cross = _hand_affinity(student, teachers["a"], T_SCALES["a"], kl=kl)
    both = Affinity(kl=kl, pairs="both").per_sample(_ctx(out, tb), "a")
    _within(both, (cross + want) / 2, _aff_tol((cross + want) / 2, "a", kl))
    # the self column is excluded: with it, every row's distribution changes by far more than the tolerance
    with_self = torch.stack([torch.softmax(S_SCALE * student["image"][i] @ student["image"].T, 0)[i] for i in range(N)])
    assert (with_self > 0.01).all()


def test_intra_pairs_with_domain_scope_and_through_distill_loss():
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers, DOMAINS)
    got = Affinity(scope="domain", pairs="intra").per_sample(_ctx(out, tb), "a")
    want = _hand_intra(student, teachers["a"], T_SCALES["a"], domains=DOMAINS)
    _within(got, want, _aff_tol(want, "a"))
    assert got[3] == 0  # alone in its domain: no other row, no pair
    loss = DistillLoss([LossTermCfg("aff", "affinity", 2.0, {"a": 1.0}, {"pairs": "intra"})], ["a", "b"])
    out, tb, _ = _batch(student, teachers)
    want = _hand_intra(student, teachers["a"], T_SCALES["a"])
    _within(loss(out, tb)["aff"], 2.0 * want.mean(), 2.0 * _aff_tol(want.mean().item(), "a"))


def test_intra_pairs_exclude_the_rows_own_global_column_on_a_later_rank():
    """On rank 1 of 2 the local rows sit at offset N of the gathered batch: their own columns are N..2N-1. Rank 0's
    rows here are rank 1's rolled by one, so each row also has an identical copy at another column, which must stay
    (exclusion by index, not by value)."""
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers)
    ctx = StepContext(out, tb, StepGather(lambda x, with_grad: (torch.cat([x.roll(1, 0), x]), N)))
    got = Affinity(pairs="intra").per_sample(ctx, "a")
    glob = lambda f: {m: torch.cat([f[m].roll(1, 0), f[m]]) for m in ("image", "text")}  # noqa: E731
    want = _hand_intra(glob(student), glob(teachers["a"]), T_SCALES["a"], rows=range(N, 2 * N))
    _within(got, want, _aff_tol(want, "a"))
    # excluding column i instead (offset ignored) keeps the row's own column: the values move far past the bound
    wrong = _hand_intra(glob(student), glob(teachers["a"]), T_SCALES["a"], rows=range(N, 2 * N), own=lambda i: i - N)
    assert ((want - wrong).abs() > 10 * _aff_tol(want, "a")).any()


def test_unknown_pairs_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^affinity pairs 'self' is unknown; use one of cross, intra, both$"):
        Affinity(pairs="self")
