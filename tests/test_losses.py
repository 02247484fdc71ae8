"""Each loss term against a hand computation (explicit loops), teacher combination, PHI-S and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss

from distill.losses import (
    CombineCfg,
    DistillLoss,
    LossTermCfg,
    StudentOutput,
    TeacherBatch,
    hadamard,
    phi_s_affine,
)
from distill.losses.combine import TeacherDraw, weight_matrix
from distill.losses.distributed import StepGather
from distill.losses.terms import StepContext
from teachers.kernel.modality import Pair

B, E = 6, 8
DIMS = {"a": 3, "b": 5}  # two teachers of different dimensions
SCALES = {"a": 50.0, "b": 100.0}

# Float32 bounds. Every loss term computes in float32 by design, so the references are float64 (hand loops, or
# open_clip on float64 copies of the same float32 inputs) and a bound is the float32 path's own worst-case rounding,
# which holds in any summation order (AVX2 or AVX-512 kernels, 1 or 2 threads); u = 2^-24.
U = 2.0**-24


def logit_err(s: float, d: int, normalised: bool = False) -> float:
    """|float32 - exact| of a logit s x a.b, |a|, |b| <= 1 in d dims: d products and d - 1 sums of summands
    |a_k b_k| totalling <= 1, and the scale's rounding: (d + 2) u s. An `a` normalised in float32 first (a
    projection) has components off by <= ((d + 1) / 2 + 2) u relative: (d + 5) / 2 x u s more."""
    return (d + 2 + (d + 5) / 2 * normalised) * U * s


def ce_err(s: float, d: int, n: int, normalised: bool = False) -> float:
    """|float32 - exact| of one row's cross-entropy -sum_j T_j log softmax_j(L), n logits of scale s, T a
    distribution: its derivative in L (softmax - T) has l1 norm <= 2, so the logits' errors move it by
    <= 2 logit_err; its own rounding (L - max L with |L - max| <= 2s, exp, a sum of n terms in [0, 1] totalling
    >= 1, log, T's weighted sum) adds <= (4 s + n + 6) u."""
    return 2 * logit_err(s, d, normalised) + (4 * s + n + 6) * U


def nce_tol(value: float, s: float, d: int, n: int, normalised: bool = False) -> float:
    """|float32 - exact| of a contrastive term: a mean of 2n non-negative row cross-entropies (~ value)."""
    return ce_err(s, d, n, normalised) + 2 * n * U * abs(value)


def nce_grad_err(s: float, d: int, n: int) -> float:
    """|float32 - exact| of a gradient component of InfoNCE (the mean of 2n row cross-entropies) by a unit vector x
    that is a row in one direction and a column in the other: (s / 2n) x [sum_j (p_ij - T_ij) y_jk +
    sum_r (q_ri - T_ri) y_rk], |y_k| <= 1. Softmax errors are |dp_ij| <= 2 p_ij logit_err, and the p's summed here
    total <= 1 (a row) + n (a column): <= 2 (n + 1) logit_err; the softmax's own rounding ((n + 3) u of each p) and
    the 2n + 2 summands' sums (totalling <= n + 3) add < 4 (n + 1)(n + 3) u."""
    return s / (2 * n) * (n + 1) * (2 * logit_err(s, d) + 4 * (n + 3) * U)


def aff_tol(value, s: float, d: int, s_t: float, d_t: int, n: int, kl: bool = False):
    """|float32 - exact| of an affinity value from a softmax teacher (a row's, or the mean of rows: the bound is
    affine in the row's cross-entropy CE, so it holds for means at their mean), n columns, student logits of scale
    s in d dims, the teacher's s_t in d_t. The student's logit errors move CE by <= 2 logit_err(s, d) (l1 of q - p
    <= 2); the teacher's by <= 2 CE logit_err(s_t, d_t) (the derivative p_k (-log q_k - CE) has l1 <= 2 CE; the
    KL's, p_k (log p_k - log q_k - KL), <= H + CE + KL = 2 CE too). Its own rounding: a log-softmax value (a caption
    class's log-mass included) is off by <= (8 s + 5 n) u, a teacher probability by that + u relative, the n-term
    sum of non-negative products (n + 1) u relative: (8 s + 5 n) u + (8 s_t + 6 n + 2) u CE, as much again for the
    teacher's entropy under KL (CE = KL + H <= KL + log n); a mean of 2n rows adds 2 n u relative."""
    ce = abs(value) + kl * math.log(n)
    own = (8 * s + 5 * n) * U + (8 * s_t + 6 * n + 2) * U * ce
    return 2 * logit_err(s, d) + 2 * ce * logit_err(s_t, d_t) + (1 + kl) * own + 2 * n * U * abs(value)


def sigmoid_aff_tol(value, s: float, b: float, d: int, s_t: float, b_t: float, d_t: int, n: int, kl: bool = False):
    """|float32 - exact| of an affinity value from a sigmoid teacher (a row's sum over its <= n pairs, both
    directions averaged, or a mean of such rows: affine in the value again). Pair logits s x.y + b within
    LS = logit_err(s, d) + X u (X = s + |b| bounds them; the bias's addition), the teacher's within LT likewise.
    A pair's binary cross-entropy has derivative sigmoid(x_s) - p_t (<= 1) in the student's logit and
    -sigmoid'(x_t) x_s (<= X / 4) in the teacher's; the KL's, sigmoid'(x_t)(x_t - x_s), <= 0.23 + X / 4. Its own
    rounding (the sigmoid, (1 - p) x, log1p(exp(-|x|))) <= (3 X + 4) u, and as much for the teacher's entropy under
    KL; the row's n-term sum and a mean of 2n rows add 3 n u of the summands' total, <= the value (+ n log 2 of
    entropy under KL, where the row is CE - H)."""
    x, x_t = s + abs(b), s_t + abs(b_t)
    ls, lt = logit_err(s, d) + x * U, logit_err(s_t, d_t) + x_t * U
    pair = ls + (x / 4 + 0.23 * kl) * lt + (3 * x + 4) * U + kl * (3 * x_t + 4) * U
    return n * pair + 3 * n * U * (abs(value) + kl * 1.4 * n)


def feature_tol(value: float, d: int, n: int, weight: float = 1.0, m: float = 1.0) -> float:
    """|float32 - exact| of a feature term of this weight (`value` includes it), targets of norm <= m in d dims, n
    rows. The projection normalised in float32 is off by <= (d + 5) / 2 u relative (logit_err), which moves a row's
    1 - cos (cosine_similarity renormalises both sides: twice that more, then a d-term dot of total <= 1) by
    <= (5 d / 2 + 10) u, its mean of squares (p - y)^2 by <= 2 |p - y| |dp| / d <= (1 + m)(d + 5) u / d, its
    smooth_l1 (slope <= 1) by <= |dp|_1 / d <= (d + 5) u / 2: all <= (3 d + 10)(1 + m) u. Every summand after that
    is non-negative (the metrics' own few roundings, the means over dims, modalities, rows and teachers, the mix
    weights): (n + d + 8) u relative."""
    return weight * (3 * d + 10) * (1 + m) * U + (n + d + 8) * U * abs(value)


def _unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def make_batch(seed=0, b=B, dims=DIMS):
    g = torch.Generator().manual_seed(seed)
    student = StudentOutput(
        image=_unit(b, E, g=g),
        text=_unit(b, E, g=g),
        logit_scale=torch.tensor(14.0),
        projected={t: Pair.build(lambda m, d=d: torch.randn(b, d, generator=g)) for t, d in dims.items()},
    )
    teachers = TeacherBatch(
        feats={t: Pair.build(lambda m, d=d: _unit(b, d, g=g)) for t, d in dims.items()},
        logit_scale={t: SCALES.get(t, 30.0) for t in dims},
    )
    return student, teachers


def _loss(terms, teachers=("a", "b"), **kw):
    return DistillLoss(terms, list(teachers), **kw)


def _dot(u, v):
    return sum(float(u[k]) * float(v[k]) for k in range(len(u)))


def _log_softmax_row(logits, i):
    m = max(logits)
    return logits[i] - m - math.log(sum(math.exp(x - m) for x in logits))


def _hand_infonce(img, txt, s):
    n = len(img)
    tot = 0.0
    for i in range(n):
        tot -= _log_softmax_row([s * _dot(img[i], txt[j]) for j in range(n)], i)
        tot -= _log_softmax_row([s * _dot(txt[i], img[j]) for j in range(n)], i)
    return tot / (2 * n)


def _norm(v):
    n = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / n for x in v]


# ---------------------------------------------------------------------------------------------- infonce


def test_infonce_equals_hand_computation_and_open_clip():
    student, _ = make_batch()
    out = _loss([LossTermCfg("infonce", "infonce")], teachers=())(student, None)
    # open_clip on float64 copies (it computes in its input dtype): the float32 term is within nce_tol (2.6e-5 of
    # 7.1 here; measured 3.6e-7); the scale off by 1% moves it by 6e-2, a wrong label or a direction left out more
    ref = ClipLoss()(student.image.double(), student.text.double(), student.logit_scale.double()).item()
    tol = nce_tol(ref, 14.0, E, B)
    assert out["infonce"].item() == pytest.approx(ref, rel=0, abs=tol)
    assert out["infonce"].item() == pytest.approx(_hand_infonce(student.image, student.text, 14.0), rel=0, abs=tol)
    assert out["loss"].item() == pytest.approx(out["infonce"].item())


def test_infonce_gradients_equal_open_clip_and_scale_is_clamped():
    student, _ = make_batch(seed=1)
    grads = []
    for fn, dtype in (
        (lambda s: _loss([LossTermCfg("c", "infonce")], ())(s, None)["loss"], torch.float32),
        (lambda s: ClipLoss()(s.image, s.text, s.logit_scale.clamp(max=100)), torch.float64),
    ):
        img = student.image.to(dtype, copy=True).requires_grad_()
        txt = student.text.to(dtype, copy=True).requires_grad_()
        fn(StudentOutput(img, txt, torch.tensor(400.0, dtype=dtype))).backward()
        grads.append((img.grad, txt.grad))
    assert grads[0][0].dtype == torch.float32 and grads[1][0].dtype == torch.float64
    # ours (float32) against open_clip on float64 copies of the same inputs: within nce_grad_err at the clamped
    # scale 100 (7.1e-3 here, of gradients up to 16; measured 1.8e-6); the clamp missed (scale 400) moves them by
    # 48, a direction dropped by 6, the scale off by 1% by ~0.16
    tol = nce_grad_err(100.0, E, B)
    for ours, ref in zip(grads[0], grads[1]):
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=tol)
    assert grads[0][0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------- caption positives


def _hand_soft_rows(a, b, s, ids):
    """Per row i: -sum_j T_ij log softmax_j(s a_i.b_j), T_ij = 1/|{k: ids_k = ids_i}| where ids_j = ids_i."""
    n = len(a)
    out = []
    for i in range(n):
        pos = [j for j in range(n) if ids[j] == ids[i]]
        logits = [s * _dot(a[i], b[j]) for j in range(n)]
        out.append(-sum(_log_softmax_row(logits, j) for j in pos) / len(pos))
    return out


def _per_row(loss, name, student, teachers=None, caption_ids=None, teacher=None):
    ctx = StepContext(student, teachers, StepGather(lambda x, g: (x, 0)), caption_ids=caption_ids)
    return loss.terms[name].per_sample(ctx, teacher)


DUP_IDS = torch.tensor([7, 3, 7, 5])  # rows 0 and 2 have the same caption


def test_infonce_caption_positives_equal_the_soft_target_by_hand():
    student, _ = make_batch(seed=30, b=4)
    loss = _loss([LossTermCfg("nce", "infonce", kwargs={"positives": "caption"})], teachers=())
    assert loss.uses_caption_ids
    got = _per_row(loss, "nce", student, caption_ids=DUP_IDS)
    img, txt, ids = student.image.tolist(), student.text.tolist(), DUP_IDS.tolist()
    want = [(u + v) / 2 for u, v in zip(_hand_soft_rows(img, txt, 14.0, ids), _hand_soft_rows(txt, img, 14.0, ids))]
    # each row the mean of two float32 cross-entropies against float64 loops: within ce_err (2.1e-5; the bug
    # this guards, a target not spread over the caption's copies, moves rows 0 and 2 by 0.09 and 1.9)
    torch.testing.assert_close(
        got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=ce_err(14.0, E, 4), check_dtype=False
    )
    # by hand for row 0: targets 1/2 on columns 0 and 2
    lg = [14.0 * _dot(img[0], txt[j]) for j in range(4)]
    assert want[0] != pytest.approx(-_log_softmax_row(lg, 0))  # the soft target really differs from the diagonal
    out = loss(student, None, caption_ids=DUP_IDS)
    assert out["nce"].item() == pytest.approx(sum(want) / 4, rel=0, abs=nce_tol(sum(want) / 4, 14.0, E, 4))
    # rows with a caption of their own (1, 3) keep exactly their diagonal value; rows 0 and 2 do not
    diag = _loss([LossTermCfg("nce", "infonce")], teachers=())
    plain = _per_row(diag, "nce", student)
    assert torch.equal(got[[1, 3]], plain[[1, 3]]) and not torch.allclose(got[[0, 2]], plain[[0, 2]])


def test_caption_positives_with_distinct_captions_equal_the_diagonal_exactly():
    student, teachers = make_batch(seed=31, b=4)
    distinct = torch.tensor([11, 3, 7, 5])
    for kind, name in (("infonce", None), ("icl", "a"), ("icl", "b")):
        tnames = () if name is None else (name,)
        cap = _loss([LossTermCfg("t", kind, kwargs={"positives": "caption"})], teachers=tnames)
        diag = _loss([LossTermCfg("t", kind, kwargs={"positives": "diagonal"})], teachers=tnames)
        plain = _loss([LossTermCfg("t", kind)], teachers=tnames)
        t = None if name is None else teachers
        got = _per_row(cap, "t", student, t, distinct, name)
        assert torch.equal(got, _per_row(diag, "t", student, t, None, name))
        assert torch.equal(got, _per_row(plain, "t", student, t, None, name))
        assert torch.equal(cap(student, t, caption_ids=distinct)["t"], plain(student, t)["t"])


def test_icl_caption_positives_equal_the_soft_target_by_hand():
    student, teachers = make_batch(seed=32, b=4)
    for t in DIMS:  # rows 0 and 2 share a caption, so the teacher's text embeddings of them are identical
        teachers.feats[t].text[2] = teachers.feats[t].text[0]
    loss = _loss(
        [LossTermCfg("icl", "icl", weight=2.0, teachers={"a": 1.0, "b": 3.0}, kwargs={"positives": "caption"})]
    )
    diag = _loss([LossTermCfg("icl", "icl", teachers={"a": 1.0, "b": 3.0})])
    ids = DUP_IDS.tolist()
    want = {}
    for t in DIMS:
        p = {m: [_norm(v) for v in student.projected[t][m]] for m in ("image", "text")}
        y = {m: teachers.feats[t][m].tolist() for m in ("image", "text")}
        rows = [
            (u + v) / 2
            for u, v in zip(
                _hand_soft_rows(p["image"], y["text"], 14.0, ids), _hand_soft_rows(p["text"], y["image"], 14.0, ids)
            )
        ]
        got = _per_row(loss, "icl", student, teachers, DUP_IDS, t)
        # float32 rows of normalised projections (d = 3, 5) against float64 loops: within ce_err (2.4e-5 at d = 5)
        torch.testing.assert_close(
            got,
            torch.tensor(rows, dtype=torch.float64),
            rtol=0,
            atol=ce_err(14.0, DIMS[t], 4, normalised=True),
            check_dtype=False,
        )
        plain = _per_row(diag, "icl", student, teachers, None, t)
        assert torch.equal(got[[1, 3]], plain[[1, 3]]) and not torch.allclose(got[[0, 2]], plain[[0, 2]])
        want[t] = sum(rows) / 4
    got = loss(student, teachers, caption_ids=DUP_IDS)["icl"].item()
    tol = 2.0 * max(nce_tol(want[t], 14.0, d, 4, normalised=True) for t, d in DIMS.items())  # weight 2 x the worse
    assert got == pytest.approx(2.0 * (0.25 * want["a"] + 0.75 * want["b"]), rel=0, abs=tol)


def test_caption_positives_change_nothing_when_identical_captions_embed_identically():
    """Worth knowing: when every copy of a caption has the same embedding (a text tower without dropout), the
    duplicated columns tie, so the soft target's batch mean and gradients equal the diagonal ones (per-row values
    differ), and the floor of both is the target's entropy, ln(copies). It differs when the copies' embeddings
    differ (text dropout: the biomedclip presets use 0.1)."""
    g = torch.Generator().manual_seed(34)
    img, base = _unit(6, E, g=g), _unit(4, E, g=g)
    ids = torch.tensor([1, 2, 1, 3, 1, 2])
    res = {}
    for positives in ("diagonal", "caption"):
        i, b = img.clone().requires_grad_(), base.clone().requires_grad_()
        loss = _loss([LossTermCfg("nce", "infonce", kwargs={"positives": positives})], teachers=())
        value = loss(StudentOutput(i, b[ids], torch.tensor(14.0)), None, caption_ids=ids)["loss"]
        value.backward()
        res[positives] = (value.detach(), i.grad, b.grad)
    # two float32 paths, each within its bound of the same exact values: the mean within 2 nce_tol (4.6e-5 of 3.5),
    # the image gradients within 2 nce_grad_err, the base's (each row summed from <= 3 copies) within 6 (3.1e-4 and
    # 9.2e-4, of gradients up to 2.9; measured <= 4.8e-7). Targets on the first copy only instead of uniform over
    # the copies move the mean by 0.41 and the gradients by >= 1.8.
    value, grad_tol = res["diagonal"][0].item(), nce_grad_err(14.0, E, 6)
    torch.testing.assert_close(res["caption"][0], res["diagonal"][0], rtol=0, atol=2 * nce_tol(value, 14.0, E, 6))
    torch.testing.assert_close(res["caption"][1], res["diagonal"][1], rtol=0, atol=2 * grad_tol)
    torch.testing.assert_close(res["caption"][2], res["diagonal"][2], rtol=0, atol=6 * grad_tol)
    # copies with different embeddings (as under dropout): now the targets matter
    txt = F.normalize(base[ids] + 0.3 * torch.randn(6, E, generator=g), dim=-1)
    vals = [
        _loss([LossTermCfg("nce", "infonce", kwargs={"positives": p})], teachers=())(
            StudentOutput(img, txt, torch.tensor(14.0)), None, caption_ids=ids
        )["loss"].item()
        for p in ("diagonal", "caption")
    ]
    assert vals[0] != pytest.approx(vals[1], rel=1e-3)


def test_caption_positives_errors():
    student, _ = make_batch(seed=33, b=4)
    loss = _loss([LossTermCfg("nce", "infonce", kwargs={"positives": "caption"})], teachers=())
    with pytest.raises(ValueError, match=r"positives='caption', but the batch carries no caption ids"):
        loss(student, None)
    with pytest.raises(ValueError, match=r"caption_ids has 3 rows; expected 4"):
        loss(student, None, caption_ids=torch.tensor([1, 2, 3]))
    for kind in ("infonce", "icl"):
        with pytest.raises(ValueError, match=rf"{kind} positives 'label' is unknown; use one of diagonal, caption"):
            _loss([LossTermCfg("t", kind, kwargs={"positives": "label"})])
    with pytest.raises(ValueError, match=r"bad options \['positives'\]"):  # not an option of the feature term
        _loss([LossTermCfg("f", "feature", kwargs={"positives": "caption"})])
    assert not _loss([LossTermCfg("nce", "infonce")], teachers=()).uses_caption_ids


# ---------------------------------------------------------------------------------------------- feature


def _hand_feature(p, y, metric, normalise=True):
    """Per-sample metric, a plain loop over dims."""
    out = []
    for i in range(len(p)):
        pi = _norm(p[i]) if normalise else [float(x) for x in p[i]]
        yi = [float(x) for x in y[i]]
        if metric == "cosine":
            out.append(1 - _dot(pi, yi) / math.sqrt(_dot(pi, pi) * _dot(yi, yi)))
        elif metric == "mse":
            out.append(sum((u - v) ** 2 for u, v in zip(pi, yi)) / len(yi))
        else:  # smooth_l1, beta 1
            d = [abs(u - v) for u, v in zip(pi, yi)]
            out.append(sum(0.5 * x * x if x < 1 else x - 0.5 for x in d) / len(d))
    return out


@pytest.mark.parametrize("metric", ["cosine", "mse", "smooth_l1"])
def test_feature_term_weighted_over_two_teachers(metric):
    student, teachers = make_batch(seed=2)
    cfg = LossTermCfg("feat", "feature", weight=50.0, teachers={"a": 1.0, "b": 3.0}, kwargs={"metric": metric})
    out = _loss([cfg])(student, teachers)
    want = 0.0
    for t, share in (("a", 0.25), ("b", 0.75)):
        per = [
            (u + v) / 2
            for u, v in zip(
                *(_hand_feature(student.projected[t][m], teachers.feats[t][m], metric) for m in ("image", "text"))
            )
        ]
        want += share * sum(per) / B
    # float32 against float64 loops: within feature_tol (d = 5: 2.2e-4 of 59, 1.6e-4 of 13; measured <= 1.6e-6); the
    # teachers' shares swapped move it by >= 2.9, a projection left unnormalised (mse, smooth_l1) by >= 17
    assert out["feat"].item() == pytest.approx(50.0 * want, rel=0, abs=feature_tol(50.0 * want, 5, B, weight=50.0))


def test_feature_image_only_and_smooth_l1_beta():
    student, teachers = make_batch(seed=3)
    for t in DIMS:  # scale targets up so |diff| crosses beta
        teachers.feats[t] = Pair(teachers.feats[t].image * 4, teachers.feats[t].text)
    cfg = LossTermCfg(
        "f", "feature", teachers={"a": 1.0}, kwargs={"metric": "smooth_l1", "modalities": ["image"], "beta": 0.5}
    )
    got = _loss([cfg])(student, teachers)["f"].item()
    p, y = student.projected["a"].image, teachers.feats["a"].image
    tot = 0.0
    for i in range(B):
        pi = _norm(p[i])
        d = [abs(u - float(v)) for u, v in zip(pi, y[i])]
        tot += sum(0.5 * x * x / 0.5 if x < 0.5 else x - 0.25 for x in d) / len(d)
    # targets of norm 4 (m = 4), d = 3: within feature_tol (7.3e-6 of 1.6; measured 1.1e-7); beta 1 instead of 0.5
    # moves it by 0.20
    assert got == pytest.approx(tot / B, rel=0, abs=feature_tol(tot / B, 3, B, m=4.0))


# ---------------------------------------------------------------------------------------------- icl


def _hand_icl(student, teachers, t, s=14.0):
    tot = 0.0
    for mine, other in (("image", "text"), ("text", "image")):
        p = [_norm(v) for v in student.projected[t][mine]]
        y = teachers.feats[t][other]
        for i in range(B):
            tot -= _log_softmax_row([s * _dot(p[i], y[j]) for j in range(B)], i) / 2
    return tot / B


def test_icl_two_teachers_of_different_dims():
    student, teachers = make_batch(seed=4)
    out = _loss([LossTermCfg("icl", "icl", weight=2.0)])(student, teachers)
    icl = {t: _hand_icl(student, teachers, t) for t in DIMS}
    want = 0.5 * icl["a"] + 0.5 * icl["b"]
    # each teacher's term within nce_tol, the projection normalised in float32; weight 2, shares 1/2 (5.5e-5 of 16;
    # measured 1e-8); the scale off by 1% moves it by 0.16
    tol = 2.0 * sum(0.5 * nce_tol(icl[t], 14.0, d, B, normalised=True) for t, d in DIMS.items())
    assert out["icl"].item() == pytest.approx(2.0 * want, rel=0, abs=tol)


# ---------------------------------------------------------------------------------------------- affinity


def _hand_affinity(student, teachers, t, s=14.0, kl=False):
    ts = SCALES[t]
    tot = 0.0
    for mine, other in (("image", "text"), ("text", "image")):
        si, sj = getattr(student, mine), getattr(student, other)
        ti, tj = teachers.feats[t][mine], teachers.feats[t][other]
        for i in range(B):
            s_log = [_log_softmax_row([s * _dot(si[i], sj[k]) for k in range(B)], j) for j in range(B)]
            t_log = [_log_softmax_row([ts * _dot(ti[i], tj[k]) for k in range(B)], j) for j in range(B)]
            row = -sum(math.exp(tl) * sl for tl, sl in zip(t_log, s_log))
            if kl:
                row += sum(math.exp(tl) * tl for tl in t_log)
            tot += row / 2
    return tot / B


@pytest.mark.parametrize("kl", [False, True])
def test_affinity_two_teachers_of_different_dims(kl):
    student, teachers = make_batch(seed=5)
    cfg = LossTermCfg("aff", "affinity", teachers={"a": 2.0, "b": 1.0}, kwargs={"kl": kl})
    out = _loss([cfg])(student, teachers)
    aff = {t: _hand_affinity(student, teachers, t, kl=kl) for t in DIMS}
    want = 2 / 3 * aff["a"] + 1 / 3 * aff["b"]
    # each teacher's term within aff_tol, whose teacher-logit part (scales 50, 100) dominates (5.2e-4 and 9.3e-4 of 6;
    # measured <= 9e-7); the teachers' weights swapped move it by >= 0.25, the student's scale off by 1% by 0.059,
    # the teachers' off by 10% by >= 3.4e-3, the student's scale used for the teachers by >= 1.8e-2
    tol = sum(w * aff_tol(aff[t], 14.0, E, SCALES[t], DIMS[t], B, kl) for t, w in (("a", 2 / 3), ("b", 1 / 3)))
    assert out["aff"].item() == pytest.approx(want, rel=0, abs=tol)


def test_affinity_equals_open_clip_distill_loss():
    student, teachers = make_batch(seed=6)
    out = _loss([LossTermCfg("aff", "affinity", teachers={"b": 1.0})])(student, teachers)
    f = teachers.feats["b"]
    # open_clip on float64 copies (it computes in its input dtype): the float32 term within aff_tol (1.2e-3 of 8.7;
    # measured 1.2e-6); bug sizes as in the test above
    ref = DistillClipLoss()(
        student.image.double(),
        student.text.double(),
        student.logit_scale.double(),
        f.image.double(),
        f.text.double(),
        torch.tensor(SCALES["b"], dtype=torch.float64),
        output_dict=True,
    )["distill_loss"].item()
    assert out["aff"].item() == pytest.approx(ref, rel=0, abs=aff_tol(ref, 14.0, E, SCALES["b"], DIMS["b"], B))


# ---------------------------------------------------------------------------------------------- combination


def _hand_feature_both(student, teachers, t, metric):
    """Per-sample feature term for teacher t: image and text averaged."""
    img, txt = (_hand_feature(student.projected[t][m], teachers.feats[t][m], metric) for m in ("image", "text"))
    return [(u + v) / 2 for u, v in zip(img, txt)]


def test_random_teacher_each_sample_uses_exactly_its_teacher():
    n = 16
    student, teachers = make_batch(seed=7, b=n)
    loss = _loss([LossTermCfg("f", "feature", kwargs={"metric": "mse"})], combine=CombineCfg(mode="random_teacher"))
    g = torch.Generator().manual_seed(123)
    draw = loss.draw(n, torch.Generator().manual_seed(123))  # the same draws forward makes first

    mix = weight_matrix(loss.combine_cfg, loss.teacher_weights["f"], draw, n)
    assert torch.equal(mix.sum(1), torch.ones(n)) and set(mix.flatten().tolist()) == {0.0, 1.0}
    assigned = ["a" if mix[i, 0] == 1 else "b" for i in range(n)]
    assert 0 < assigned.count("a") < n  # both teachers used with equal weights and 16 samples

    got = loss(student, teachers, generator=g)["f"].item()
    per = {t: _hand_feature_both(student, teachers, t, "mse") for t in DIMS}
    want = sum(per[assigned[i]][i] for i in range(n)) / n
    # within feature_tol (4.1e-6 of 0.62; measured 1.6e-9); one row given the other teacher moves it by >= 1.1e-3
    assert got == pytest.approx(want, rel=0, abs=feature_tol(want, 5, n))

    # changing teacher b's targets on the rows assigned to a leaves the loss unchanged; on b's rows it does not
    for rows_of, changes in (("a", False), ("b", True)):
        t2 = TeacherBatch({t: f.map(torch.clone) for t, f in teachers.feats.items()}, teachers.logit_scale)
        rows = [i for i in range(n) if assigned[i] == rows_of]
        t2.feats["b"].image[rows] = -t2.feats["b"].image[rows]
        again = loss(student, t2, generator=torch.Generator().manual_seed(123))["f"].item()
        assert (again != pytest.approx(got, rel=1e-6)) == changes


def test_random_teacher_follows_teacher_weights():
    n = 4000
    student, teachers = make_batch(seed=8, b=8)
    cfg = LossTermCfg("f", "feature", teachers={"a": 1.0, "b": 3.0})
    loss = _loss([cfg], combine=CombineCfg(mode="random_teacher"))

    draw = loss.draw(n, torch.Generator().manual_seed(0))
    share_b = weight_matrix(loss.combine_cfg, loss.teacher_weights["f"], draw, n)[:, 1].mean().item()
    assert share_b == pytest.approx(0.75, abs=0.03)


def test_teacher_dropping_never_drops_all_and_renormalises():
    names = ["a", "b", "c"]
    dims = {"a": 3, "b": 5, "c": 4}
    terms = [
        LossTermCfg("f", "feature", teachers={"a": 1.0, "b": 1.0, "c": 2.0}),
        LossTermCfg("g", "icl", teachers={"c": 1.0}),
    ]
    loss = DistillLoss(terms, names, CombineCfg(drop_prob=0.9))
    g = torch.Generator().manual_seed(0)
    kept_counts = {t: 0 for t in names}
    for _ in range(300):
        d = loss.draw(4, g)
        assert any(d.kept[t] for t in names) and d.kept["c"]  # term g has only c: never dropped
        for t in names:
            kept_counts[t] += d.kept[t]
    assert kept_counts["a"] < 60 and kept_counts["b"] < 60  # dropped ~90% of the time (c serves both terms)

    # with a fixed generator the term equals the renormalised weighted sum over the kept teachers
    student, teachers = make_batch(seed=9, dims=dims)
    for seed in range(6):
        kept = loss.draw(B, torch.Generator().manual_seed(seed)).kept
        got = loss(student, teachers, generator=torch.Generator().manual_seed(seed))["f"].item()
        w = {t: ww for t, ww in {"a": 1.0, "b": 1.0, "c": 2.0}.items() if kept[t]}
        want = sum(w[t] / sum(w.values()) * sum(_hand_feature_both(student, teachers, t, "cosine")) / B for t in w)
        # within feature_tol (4.1e-6 of 1.0; measured 4.1e-8); the teachers' values differ by >= 1.6e-2, so a share
        # off by 0.1 (not renormalised over the kept ones) moves it by >= 1.6e-3
        assert got == pytest.approx(want, rel=0, abs=feature_tol(want, 5, B))


# ---------------------------------------------------------------------------------------------- PHI-S


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 40, 64, 384, 768])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=h.dtype))


def test_hadamard_absent_sizes():
    assert hadamard(6) is None and hadamard(7) is None


def _anisotropic(n, d, seed):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    spread = np.exp(rng.normal(size=d) * 2)  # eigenvalues over several orders of magnitude
    return rng.normal(size=(n, d)) * np.sqrt(spread) @ basis.T + rng.normal(size=d) * 3


@pytest.mark.parametrize("dims", [(24, 40), (6, 10)])  # Hadamard sizes; sizes with none (exact fallback)
def test_phi_s_gives_every_teacher_unit_variance_per_dimension(dims):
    variances = []
    for k, d in enumerate(dims):
        x = _anisotropic(3000, d, seed=k) * (10.0**k)  # teachers with very different scales
        w, b = phi_s_affine(x.mean(0), np.cov(x, rowvar=False))
        y = x @ w.T + b
        np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
        var = y.var(0, ddof=1)
        np.testing.assert_allclose(var, 1.0, rtol=1e-8)
        variances.append(var)
        # W is alpha times a rotation: PHI-S is isotropic (a single scale) and invertible
        alpha2 = (w @ w.T)[0, 0]
        np.testing.assert_allclose(w @ w.T, alpha2 * np.eye(d), atol=1e-9 * alpha2)
        before = x.var(0, ddof=1)
        assert before.max() / before.min() > 5  # the input really was anisotropic
    assert np.concatenate(variances).std() < 1e-8


def test_phi_s_standardises_feature_targets_in_the_loss():
    student, teachers = make_batch(seed=10, dims={"a": 4, "b": 6})
    stats = {}
    for k, (t, d) in enumerate({"a": 4, "b": 6}.items()):
        x = _anisotropic(500, d, seed=20 + k)
        stats[t] = {
            "image_mean": x.mean(0),
            "image_cov": np.cov(x, rowvar=False),
            "text_mean": -x.mean(0),
            "text_cov": 2 * np.cov(x, rowvar=False),
        }
    loss = _loss(
        [LossTermCfg("f", "feature", kwargs={"metric": "mse"})],
        combine=CombineCfg(balance="phi_s"),
        teacher_stats=stats,
    )
    got = loss(student, teachers)["f"].item()
    want, err = 0.0, 0.0
    for t in ("a", "b"):
        per = []
        for m in ("image", "text"):
            w, b = phi_s_affine(stats[t][f"{m}_mean"], stats[t][f"{m}_cov"])
            x = teachers.feats[t][m].double().numpy()
            y = x @ w.T + b
            per.append(_hand_feature(student.projected[t][m], y, "mse", normalise=False))
            # the float32 target W x + b (W, b rounded once, d products, d - 1 sums, + b) is off by <= (d + 3) u
            # (|W| |x| + |b|) per component, which moves a row's mean of squares by <= sum_k 2 |p_k - y_k| dy_k / d
            dy = (x.shape[1] + 3) * U * (np.abs(x) @ np.abs(w).T + np.abs(b))
            p = student.projected[t][m].double().numpy()
            err += 0.5 * 0.5 * (2 * np.abs(p - y) * dy).mean(1).mean()
        want += 0.5 * sum((u + v) / 2 for u, v in zip(*per)) / B
    # + the mse's own rounding and the means' (non-negative summands), as feature_tol (1.8e-5 of 8.4; measured
    # 2.4e-7); targets not standardised would move it by O(1)
    assert got == pytest.approx(want, rel=0, abs=err + (B + 6 + 8) * U * want)


# ---------------------------------------------------------------------------------------------- the whole loss


def test_formula_total_and_zero_weight_terms_skipped():
    terms = [
        LossTermCfg("infonce", "infonce"),
        LossTermCfg("feat_mse", "feature", weight=50.0, kwargs={"metric": "mse"}),
        LossTermCfg("icl", "icl", weight=0.0),
        LossTermCfg("aff", "affinity", weight=0.5),
    ]
    loss = _loss(terms)
    assert str(loss) == "Loss = 1.0 * infonce + 50.0 * feat_mse + 0.5 * aff"
    assert list(loss.terms) == ["infonce", "feat_mse", "aff"]
    student, teachers = make_batch(seed=11)
    out = loss(student, teachers)
    assert set(out) == {"infonce", "feat_mse", "aff", "loss"}
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("infonce", "feat_mse", "aff")), rel=1e-6)
    half = _loss([LossTermCfg("aff", "affinity", weight=1.0)])(student, teachers)["aff"].item()
    assert out["aff"].item() == pytest.approx(0.5 * half, rel=1e-6)


def test_training_on_the_loss_makes_it_fall():
    torch.manual_seed(0)
    n, din = 16, 12
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(n, din, generator=g), torch.randn(n, din, generator=g)
    student, teachers = make_batch(seed=12, b=n)
    towers = torch.nn.ModuleDict({"image": torch.nn.Linear(din, E), "text": torch.nn.Linear(din, E)})
    heads = torch.nn.ModuleDict({f"{t}_{m}": torch.nn.Linear(E, d) for t, d in DIMS.items() for m in ("image", "text")})
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    loss = _loss(
        [
            LossTermCfg("infonce", "infonce"),
            LossTermCfg("f", "feature", 10.0),
            LossTermCfg("icl", "icl"),
            LossTermCfg("aff", "affinity"),
        ],
        combine=CombineCfg(mode="random_teacher", drop_prob=0.3),
    )
    opt = torch.optim.Adam([*towers.parameters(), *heads.parameters(), log_scale], lr=0.05)
    history = []
    for step in range(60):
        img, txt = F.normalize(towers["image"](x_img), dim=-1), F.normalize(towers["text"](x_txt), dim=-1)
        proj = {t: Pair(heads[f"{t}_image"](img), heads[f"{t}_text"](txt)) for t in DIMS}
        out = loss(StudentOutput(img, txt, log_scale.exp(), proj), teachers, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    for k in ("infonce", "f", "icl", "aff"):
        first, last = np.mean([h[k] for h in history[:5]]), np.mean([h[k] for h in history[-5:]])
        assert last < 0.7 * first, (k, first, last)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_teacher_names_it_and_the_known_ones():
    with pytest.raises(KeyError, match=r"'zz'.*teachers are: a, b"):
        _loss([LossTermCfg("f", "feature", teachers={"a": 1.0, "zz": 1.0})])


def test_bad_weights_kinds_options_and_modes():
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        LossTermCfg("f", "feature", weight=-1.0)
    with pytest.raises(ValueError, match="weight of teacher 'a'"):
        LossTermCfg("f", "feature", teachers={"a": -0.5})
    with pytest.raises(KeyError, match="did you mean infonce"):
        LossTermCfg("c", "infonse")
    with pytest.raises(ValueError, match=r"bad options \['metrc'\].*metric"):
        _loss([LossTermCfg("f", "feature", kwargs={"metrc": "mse"})])
    with pytest.raises(ValueError, match="feature metric 'l3' is unknown"):
        _loss([LossTermCfg("f", "feature", kwargs={"metric": "l3"})])
    with pytest.raises(ValueError, match="drop_prob"):
        CombineCfg(drop_prob=1.0)
    with pytest.raises(ValueError, match="combine mode 'random'"):
        CombineCfg(mode="random")
    with pytest.raises(ValueError, match="no loss term has a weight > 0"):
        _loss([LossTermCfg("f", "feature", weight=0.0)])
    with pytest.raises(ValueError, match="uses no teachers"):
        _loss([LossTermCfg("c", "infonce", teachers={"a": 1.0})])
    with pytest.raises(ValueError, match="repeated: f"):
        _loss([LossTermCfg("f", "feature"), LossTermCfg("f", "icl")])
    with pytest.raises(ValueError, match="needs teacher_stats"):
        _loss([LossTermCfg("f", "feature")], combine=CombineCfg(balance="phi_s"))
    with pytest.raises(KeyError, match=r"statistics of teacher 'a' lack \['text_cov'\]"):
        _loss(
            [LossTermCfg("f", "feature")],
            combine=CombineCfg(balance="phi_s"),
            teacher_stats={
                t: {"image_mean": np.zeros(3), "image_cov": np.eye(3), "text_mean": np.zeros(3)} for t in DIMS
            },
        )


def test_bad_batches_name_what_is_missing():
    student, teachers = make_batch(seed=13)
    loss = _loss([LossTermCfg("f", "feature")])
    with pytest.raises(ValueError, match="no teacher features"):
        loss(student, None)
    del teachers.feats["b"]
    with pytest.raises(KeyError, match=r"no features for teacher 'b'; it has \['a'\]"):
        loss(student, teachers)
    student, teachers = make_batch(seed=13)
    student.projected["b"] = Pair(torch.randn(B, 7), student.projected["b"].text)
    with pytest.raises(ValueError, match=r"teacher 'b' \(image\) has dim 7.*have dim 5"):
        loss(student, teachers)


# ---------------------------------------------------------------------------------------------- routing


def _draw(kept=("a", "b", "c"), uniforms=None):
    return TeacherDraw(
        kept={t: t in kept for t in ("a", "b", "c")}, uniforms=None if uniforms is None else torch.tensor(uniforms)
    )


ROUTE = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)  # row 3: no teacher
W3 = {"a": 1.0, "b": 2.0, "c": 5.0}


def test_routed_weighted_sum_renormalises_over_each_rows_teachers():
    mix = weight_matrix(CombineCfg(), W3, _draw(), 4, route=ROUTE)
    want = torch.tensor([[1 / 8, 2 / 8, 5 / 8], [1 / 6, 0, 5 / 6], [0, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(mix, want)
    # c dropped: row 0 -> a, b as 1:2; row 1 -> a only; row 2 -> b; row 3 nothing
    mix = weight_matrix(CombineCfg(drop_prob=0.5), W3, _draw(kept=("a", "b")), 4, route=ROUTE)
    torch.testing.assert_close(mix, torch.tensor([[1 / 3, 2 / 3, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]))
    # a and c dropped: row 1 (routed to a and c only) gets nothing this step
    mix = weight_matrix(CombineCfg(drop_prob=0.5), W3, _draw(kept=("b",)), 4, route=ROUTE)
    torch.testing.assert_close(mix, torch.tensor([[0, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0.0]]))


def test_routed_random_teacher_inverse_cdf_over_the_rows_teachers():
    # row 0: CDF over a, b, c = 1/8, 3/8, 1 -> u=0.2 picks b; row 1: a, c = 1/6, 1 -> u=0.1 picks a;
    # row 2: b only -> b whatever u; row 3: none -> zero row
    mix = weight_matrix(CombineCfg(mode="random_teacher"), W3, _draw(uniforms=[0.2, 0.1, 0.99, 0.5]), 4, route=ROUTE)
    torch.testing.assert_close(mix, torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0.0]]))
    mix = weight_matrix(CombineCfg(mode="random_teacher"), W3, _draw(uniforms=[0.4, 0.2, 0.0, 0.0]), 4, route=ROUTE)
    torch.testing.assert_close(mix, torch.tensor([[0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 0, 0.0]]))
    # unrouted == routed to everyone: the old one-process draw is unchanged
    u = torch.rand(50, generator=torch.Generator().manual_seed(3)).tolist()
    full = weight_matrix(CombineCfg(mode="random_teacher"), W3, _draw(uniforms=u), 50)
    routed = weight_matrix(
        CombineCfg(mode="random_teacher"), W3, _draw(uniforms=u), 50, route=torch.ones(50, 3, dtype=torch.bool)
    )
    assert torch.equal(full, routed)
    # dropped c: row 1 routed to a and c -> a whatever u
    mix = weight_matrix(
        CombineCfg(mode="random_teacher", drop_prob=0.5),
        W3,
        _draw(kept=("a", "b"), uniforms=[0.9, 0.9, 0.9, 0.9]),
        4,
        route=ROUTE,
    )
    torch.testing.assert_close(mix, torch.tensor([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0.0]]))


def test_routed_loss_value_equals_hand_computation():
    student, teachers = make_batch(seed=21, b=4)
    route = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([True, False, True, False])}
    routed = TeacherBatch(teachers.feats, teachers.logit_scale, route=route)
    loss = _loss(
        [
            LossTermCfg("nce", "infonce"),
            LossTermCfg("f", "feature", weight=2.0, teachers={"a": 1.0, "b": 3.0}, kwargs={"metric": "mse"}),
        ]
    )
    out = loss(student, routed)
    per = {t: _hand_feature_both(student, teachers, t, "mse") for t in DIMS}
    # row 0: a, b as 1:3; row 1: a; row 2: b; row 3: no teacher (0); the term is the mean over all 4 rows
    want = (0.25 * per["a"][0] + 0.75 * per["b"][0] + per["a"][1] + per["b"][2] + 0.0) / 4
    # feature_tol and nce_tol: 6.6e-6 of 0.66 and 2.3e-5 of 4.9 (measured <= 1.8e-7); the mean over the 3 routed
    # rows instead of all 4 moves f by 0.22, row 3 given both teachers by 0.37
    assert out["f"].item() == pytest.approx(2.0 * want, rel=0, abs=feature_tol(2.0 * want, 5, 4, weight=2.0))
    img, txt = student.image.tolist(), student.text.tolist()
    nce = _hand_infonce(img, txt, 14.0)
    assert out["nce"].item() == pytest.approx(nce, rel=0, abs=nce_tol(nce, 14.0, E, 4))  # not routed
    assert out["loss"].item() == pytest.approx(out["nce"].item() + out["f"].item(), rel=1e-6)
    # teacher b's targets on rows not routed to b do not matter
    t2 = TeacherBatch({t: f.map(torch.clone) for t, f in teachers.feats.items()}, teachers.logit_scale, route=route)
    t2.feats["b"].image[[1, 3]] = -t2.feats["b"].image[[1, 3]]
    assert loss(student, t2)["f"].item() == pytest.approx(out["f"].item(), rel=1e-6)
    with pytest.raises(KeyError, match=r"route mask has no entry for teacher\(s\) \['b'\]"):
        loss(student, TeacherBatch(teachers.feats, teachers.logit_scale, route={"a": route["a"]}))


# ---------------------------------------------------------------------------------------------- confidence


def _hand_confidence(img, txt, s):
    """p_i = (softmax_j(s img_i.txt_j)[i] + softmax_j(s txt_i.img_j)[i]) / 2, explicit loops."""
    n = len(img)
    out = []
    for i in range(n):
        a = math.exp(_log_softmax_row([s * _dot(img[i], txt[j]) for j in range(n)], i))
        b = math.exp(_log_softmax_row([s * _dot(txt[i], img[j]) for j in range(n)], i))
        out.append((a + b) / 2)
    return out


def test_confidence_weights_equal_hand_computation():
    # 3 samples, 2 teachers with known 2-d features; teacher a matches its pairs, b half does
    c, s_ = math.cos(0.3), math.sin(0.3)
    feats = {
        "a": Pair(
            image=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), text=torch.tensor([[c, s_], [-s_, c], [-c, -s_]])
        ),
        "b": Pair(
            image=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]),
            text=torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]),
        ),
    }
    scales = {"a": 5.0, "b": 3.0}
    teachers = TeacherBatch(feats, scales)
    student, _ = make_batch(seed=0, b=3, dims={"a": 2, "b": 2})
    loss = _loss(
        [LossTermCfg("f", "feature", teachers={"a": 1.0, "b": 2.0})],
        combine=CombineCfg(mode="confidence", temperature=0.5),
    )
    ctx = StepContext(student, teachers, StepGather(lambda x, g: (x, 0)))
    p = {t: _hand_confidence(feats[t].image.tolist(), feats[t].text.tolist(), scales[t]) for t in feats}
    for t in feats:
        torch.testing.assert_close(ctx.log_confidence(t).exp(), torch.tensor(p[t], dtype=torch.float64))
    # w_it ~ weight_t * p_it^(1/0.5)
    raw = [[1.0 * p["a"][i] ** 2, 2.0 * p["b"][i] ** 2] for i in range(3)]
    want = torch.tensor([[r[0] / sum(r), r[1] / sum(r)] for r in raw])
    conf = torch.stack([ctx.log_confidence(t) for t in ("a", "b")], 1)
    mix = weight_matrix(loss.combine_cfg, loss.teacher_weights["f"], loss.draw(3), 3, log_confidence=conf)
    torch.testing.assert_close(mix, want)
    # the loss uses exactly those weights; routing row 2 to b only and row 1 to none
    per = {t: _hand_feature_both(student, teachers, t, "cosine") for t in feats}
    got = loss(student, teachers)["f"].item()
    want = want.tolist()
    # cosine features in 2 dims, weights from float64 confidences rounded once: within feature_tol (2.6e-6 of 0.91;
    # measured 4.6e-8); the temperature ignored (p instead of p^2) moves it by 8.1e-3
    hand = sum(want[i][0] * per["a"][i] + want[i][1] * per["b"][i] for i in range(3)) / 3
    assert got == pytest.approx(hand, rel=0, abs=feature_tol(hand, 2, 3))
    route = {"a": torch.tensor([True, False, False]), "b": torch.tensor([True, False, True])}
    got = loss(student, TeacherBatch(feats, scales, route=route))["f"].item()
    hand = (want[0][0] * per["a"][0] + want[0][1] * per["b"][0] + per["b"][2]) / 3
    assert got == pytest.approx(hand, rel=0, abs=feature_tol(hand, 2, 3))


def test_confidence_gives_a_noise_teacher_a_much_lower_weight():
    n, d = 16, 12
    g = torch.Generator().manual_seed(5)
    img = _unit(n, d, g=g)
    txt = F.normalize(img + 0.3 * torch.randn(n, d, generator=g), dim=-1)  # matches its pairs
    noise = Pair.build(lambda m: _unit(n, d, g=g))  # random: does not match the pair
    teachers = TeacherBatch({"good": Pair(img, txt), "noise": noise}, {"good": 50.0, "noise": 50.0})
    student, _ = make_batch(seed=1, b=n, dims={"good": d, "noise": d})
    loss = _loss([LossTermCfg("f", "feature")], teachers=("good", "noise"), combine=CombineCfg(mode="confidence"))
    ctx = StepContext(student, teachers, StepGather(lambda x, g: (x, 0)))
    conf = torch.stack([ctx.log_confidence(t) for t in ("good", "noise")], 1)
    mix = weight_matrix(loss.combine_cfg, loss.teacher_weights["f"], loss.draw(n), n, log_confidence=conf)
    assert mix[:, 0].mean() > 0.9 and mix[:, 1].mean() < 0.1
    torch.testing.assert_close(mix.sum(1), torch.ones(n))
    assert not conf.requires_grad


def test_confidence_is_computed_once_per_teacher_per_step(monkeypatch):
    calls = []
    orig = StepContext.teacher_scale
    monkeypatch.setattr(StepContext, "teacher_scale", lambda self, name: calls.append(name) or orig(self, name))
    student, teachers = make_batch(seed=2)
    loss = _loss([LossTermCfg("f", "feature"), LossTermCfg("g", "icl")], combine=CombineCfg(mode="confidence"))
    loss(student, teachers)
    assert sorted(calls) == ["a", "b"]


def test_combine_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        CombineCfg(mode="confidence", temperature=0.0)
    with pytest.raises(ValueError, match="needs the teachers' per-sample log confidences"):
        weight_matrix(CombineCfg(mode="confidence"), W3, _draw(), 4)
