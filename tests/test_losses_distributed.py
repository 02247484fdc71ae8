"""Sharded losses: 2 processes (gloo, CPU) each holding half the global batch == 1 process over the whole batch.

DDP convention: each rank backpropagates its local loss; gathered-with-grad features sum every rank's gradient
into their owner, and DDP averages parameter gradients, so rank gradient / world_size == 1-process gradient and the
mean of the rank losses == the 1-process loss.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_helpers import counting_gloo_group
from test_losses import U, logit_err

from distill.losses import CombineCfg, DistillLoss, LossTermCfg, StudentOutput, TeacherBatch
from distill.losses.combine import weight_matrix
from teachers.kernel.modality import Pair

WORLD, N, E = 2, 8, 6
DIMS = {"a": 3, "b": 5}
TERMS = [
    LossTermCfg("infonce", "infonce"),
    LossTermCfg("feat", "feature", weight=5.0, teachers={"a": 1.0, "b": 2.0}, kwargs={"metric": "mse"}),
    LossTermCfg("icl", "icl"),
    LossTermCfg("aff", "affinity", weight=0.5),
]
# positives: caption: rows with the same caption id are positives of each other, within and across the ranks' halves
CAPTION_TERMS = [
    LossTermCfg("infonce", "infonce", kwargs={"positives": "caption"}),
    TERMS[1],
    LossTermCfg("icl", "icl", kwargs={"positives": "caption"}),
    TERMS[3],
]
CAPTION_IDS = torch.tensor([5, 9, 5, 2, 9, 7, 5, 2])
GRAD_KEYS = ["image", "text"] + [f"{t}/{m}" for t in DIMS for m in ("image", "text")]
# plain weighted sum; and random teacher per sample with dropping, which with the same generator seed on every rank
# draws the teachers a one-process run over the global batch draws
SEED = 8  # with this seed the random mode keeps both teachers and mixes them within each rank's half (checked)
COMBINES = {
    "sum": CombineCfg(),
    "random": CombineCfg(mode="random_teacher", drop_prob=0.5),
    # per-sample routing (rows with a only, b only, both and none, on both ranks) and label-free weights
    "routed": CombineCfg(mode="random_teacher", drop_prob=0.5),
    "routed_sum": CombineCfg(),
    "confidence": CombineCfg(mode="confidence", temperature=0.5),
    "routed_confidence": CombineCfg(mode="confidence", drop_prob=0.5),
    "caption": CombineCfg(mode="random_teacher", drop_prob=0.5),
}
ROUTE = {
    "a": torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool),
    "b": torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool),
}


# Float32 bounds of "2 processes == 1": the same float32 arithmetic in another order (a rank's rows against the
# gathered batch, gradients all-reduced, means per rank then over ranks, and the kernels' own order: AVX2 or AVX-512,
# 1 or 2 threads). Each run is within its worst-case rounding of the exact values, the two within twice that
# (derivations at test_losses.logit_err / ce_err / nce_grad_err; u = 2^-24). Logits: the student's, s = 12 over
# E = 6 with projections normalised in float32, within LE_S = logit_err(12, 6, True) = 162 u; the teachers', s_t <= 90
# over d <= 5, within LE_T = logit_err(90, 5) = 630 u. A row's cross-entropy moves by <= 2 LE_S, and for affinity by
# <= 2 LE_T x (1 + CE) more: the derivative of -sum_j p_j log q_j in the teacher's logits, -p_j (log q_j -
# sum p log q), has l1 norm <= 2 CE (log q <= 0), and 2 LE_T in the student's; its own rounding adds <= (4 x 102 +
# N + 6) u; a mean of non-negative rows 2N u relative. Confidence weights are float64 (then rounded once).
# Gradients as test_losses.nce_grad_err, (s / 2N)(N + 1) x the l1 error of a row's softmax: 2 LE_S for infonce and icl
# (weights 1, icl's logits are the student's scale times a normalised projection . a unit teacher vector), 2 (LE_S +
# LE_T) for affinity (weight 0.5, on the student's image and text only), divided by the smallest norm of a
# projection row (normalising divides its gradient by it); the mse term's own rounding is < 5 x 8 u. These are
# 1e-4 to 2e-3 of values and gradients of size 0.4 to 20 (measured <= 2e-6); a missing gather, a rank's gradient not
# summed into its owner or divided twice, labels at the wrong offset move them by >= 1e-1 (a rank's own infonce
# against the global one: 0.72).
LE_S, LE_T = logit_err(12.0, E, True), logit_err(90.0, max(DIMS.values()))
ROW_GRAD = 12.0 / (2 * N) * (N + 1)  # nce_grad_err's factor: s / 2N x (the rows and the column a vector is in)


def value_tol(value: float, weight: float) -> float:
    """|1 process - 2 processes| of a loss term of this (summed) weight and value."""
    return 2 * (weight * (2 * LE_S + 2 * LE_T + (4 * 102 + N + 6) * U) + (2 * LE_T + 2 * N * U) * abs(value))


def grad_tol(leaf: str, min_norm: float) -> float:
    """|1 process - 2 processes| of a gradient component of this leaf, whose rows have norms >= min_norm."""
    if leaf in ("image", "text"):  # infonce (1) and affinity (0.5)
        logits = 2 * LE_S + 0.5 * 2 * (LE_S + LE_T)
    else:  # a teacher's projection: icl (1) and the mse feature term
        logits = 2 * LE_S
    return 2 * (ROW_GRAD * (logits + 1.5 * 4 * (N + 3) * U) + 5 * 8 * U) / min_norm


def _global_batch():
    g = torch.Generator().manual_seed(0)
    unit = lambda d: F.normalize(torch.randn(N, d, generator=g), dim=-1)  # noqa: E731
    leaves = {"image": unit(E), "text": unit(E)}
    leaves.update({f"{t}/{m}": torch.randn(N, d, generator=g) for t, d in DIMS.items() for m in ("image", "text")})
    teachers = {t: Pair.build(lambda m, d=d: unit(d)) for t, d in DIMS.items()}
    return leaves, teachers


def _run(rows: slice, combine: CombineCfg, routed: bool = False, captions: bool = False):
    """Loss and gradients for the given rows of the global batch, in whatever process group is current."""
    leaves, feats = _global_batch()
    leaves = {k: v[rows].clone().requires_grad_() for k, v in leaves.items()}
    scale = torch.tensor(12.0, requires_grad=True)
    student = StudentOutput(
        leaves["image"],
        leaves["text"],
        scale,
        {t: Pair(leaves[f"{t}/image"], leaves[f"{t}/text"]) for t in DIMS},
    )
    teachers = TeacherBatch(
        {t: f.map(lambda v: v[rows]) for t, f in feats.items()},
        {"a": 40.0, "b": 90.0},
        route={t: r[rows] for t, r in ROUTE.items()} if routed else None,
    )
    loss = DistillLoss(CAPTION_TERMS if captions else TERMS, list(DIMS), combine)
    ids = CAPTION_IDS[rows] if captions else None
    out = loss(student, teachers, torch.Generator().manual_seed(SEED), caption_ids=ids)
    out["loss"].backward()
    grads = {k: v.grad for k, v in leaves.items()}
    grads["logit_scale"] = scale.grad
    return {k: v.detach() for k, v in out.items()}, grads


def _worker(rank: int, init_file: str, out_dir: str):
    warnings.filterwarnings("error", category=FutureWarning)  # no deprecated collective on every step
    with counting_gloo_group(rank, WORLD, init_file) as calls:
        b = N // WORLD
        for name, combine in COMBINES.items():
            rows = slice(rank * b, (rank + 1) * b)
            calls[0] = 0
            out, grads = _run(rows, combine, name.startswith("routed"), name == "caption")
            torch.save(
                {"out": out, "grads": grads, "all_gathers": torch.tensor(calls[0])},
                os.path.join(out_dir, f"{name}{rank}.pt"),
            )


@pytest.mark.slow
def test_two_processes_equal_one_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for name, combine in COMBINES.items():
        ranks = [torch.load(tmp_path / f"{name}{r}.pt", weights_only=True) for r in range(WORLD)]
        _compare(ranks, combine, name.startswith("routed"), name == "caption")
        # student image and text (with gradient) + ONE for every teacher's features and the caption ids
        assert [int(r["all_gathers"]) for r in ranks] == [3] * WORLD, name


@pytest.mark.parametrize("captions", [False, True])
def test_one_gather_for_all_teachers_whatever_their_number(captions):
    """The gather function runs once per step for all teachers' features (and caption ids), not per teacher."""

    def count(n_teachers: int) -> list[tuple[int, bool]]:
        calls: list[tuple[int, bool]] = []

        def gather(x, with_grad):
            calls.append((x.shape[1], with_grad))
            return x, 0

        g = torch.Generator().manual_seed(1)
        names = [f"t{i}" for i in range(n_teachers)]
        student = StudentOutput(
            F.normalize(torch.randn(4, E, generator=g), dim=-1),
            F.normalize(torch.randn(4, E, generator=g), dim=-1),
            torch.tensor(10.0),
            {t: Pair.build(lambda m: torch.randn(4, 3, generator=g)) for t in names},
        )
        feats = {t: Pair.build(lambda m: F.normalize(torch.randn(4, 3, generator=g), dim=-1)) for t in names}
        terms = CAPTION_TERMS if captions else TERMS
        loss = DistillLoss(
            [t if t.teachers is None else LossTermCfg(t.label, t.kind, t.weight, None, t.kwargs) for t in terms],
            names,
            CombineCfg(mode="confidence"),
            gather_fn=gather,
        )
        loss(student, TeacherBatch(feats, {t: 50.0 for t in names}), caption_ids=torch.tensor([1, 2, 1, 3]))
        return calls

    for n in (2, 9):
        calls = count(n)
        assert calls == [(E, True), (E, True), (n * 2 * 3 + 2 * captions, False)], calls


def test_caption_positives_change_the_contrastive_terms():
    diag, _ = _run(slice(None), COMBINES["caption"])
    cap, _ = _run(slice(None), COMBINES["caption"], captions=True)
    for k in ("infonce", "icl"):
        assert not torch.allclose(diag[k], cap[k], rtol=1e-3)
    torch.testing.assert_close(diag["feat"], cap["feat"])


def test_the_random_draw_exercises_both_teachers_on_both_ranks():
    loss = DistillLoss(TERMS, list(DIMS), COMBINES["random"])
    draw = loss.draw(N, torch.Generator().manual_seed(SEED))
    assert all(draw.kept.values())
    mix = weight_matrix(COMBINES["random"], loss.teacher_weights["feat"], draw, N)[:, 0].view(WORLD, -1)
    assert ((mix.sum(1) > 0) & (mix.sum(1) < N // WORLD)).all()


def _compare(ranks, combine, routed=False, captions=False):
    ref_out, ref_grads = _run(slice(None), combine, routed, captions)

    weights = {t.label: t.weight for t in TERMS}
    weights["loss"] = sum(weights.values())
    for k, v in ref_out.items():
        mean = sum(r["out"][k] for r in ranks) / WORLD
        torch.testing.assert_close(mean, v, rtol=0, atol=value_tol(v.item(), weights[k]), msg=f"term {k}")
    # each rank's local loss differs from the global one: the test would notice a missing gather
    assert not torch.allclose(ranks[0]["out"]["infonce"], ref_out["infonce"], rtol=1e-3)

    leaves, _ = _global_batch()
    for k in GRAD_KEYS:
        got = torch.cat([r["grads"][k] for r in ranks]) / WORLD
        tol = grad_tol(k, leaves[k].norm(dim=-1).min().item())
        torch.testing.assert_close(got, ref_grads[k], rtol=0, atol=tol, msg=f"gradient of {k}")
        assert ref_grads[k].abs().sum() > 0
    # the scale's gradient, sum_ij dloss/dL_ij x a_i.b_j (|a_i.b_j| <= 1): each term's logit derivatives are off by
    # <= 2 LE_S (+ 2 LE_T for affinity) + (N + 4) u in a row's l1, over 2N rows of weight 1 / 2N, and the 2N^2 + E
    # summands (totalling <= 2) are rounded: 2.6e-4 (measured 0; gradient 1.5)
    scale_tol = 2 * (2.5 * (2 * LE_S + (N + 4) * U + 2 * (2 * N * N + E) * U) + 0.5 * 2 * LE_T)
    scale_grad = sum(r["grads"]["logit_scale"] for r in ranks) / WORLD
    torch.testing.assert_close(scale_grad, ref_grads["logit_scale"], rtol=0, atol=scale_tol)
