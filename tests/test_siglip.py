"""The siglip term (SigLIP's sigmoid loss with a learnable bias) and affinity from a sigmoid teacher.

Values against open_clip's SigLipLoss and explicit loops, gradients against open_clip's autograd and SigLIP's
closed-form bias gradient, 2 gloo processes equal 1, and tiny training runs whose loss falls and whose export
carries the learnt bias into stock open_clip.
"""

from __future__ import annotations

import math
import os

import h5py
import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from gloo_helpers import counting_gloo_group
from open_clip.loss import SigLipLoss
from safetensors.torch import load_file, save_file
from test_grad_cache import FP64_TOL, _assert_equal, _grads
from test_losses import SCALES, U, _dot, _hand_affinity, aff_tol, logit_err, make_batch, sigmoid_aff_tol
from test_losses import E as BATCH_E  # make_batch's student dimension
from test_losses_distributed import CAPTION_IDS, DIMS, WORLD, E, N, _global_batch
from train_fixtures import NO_DROPOUT, ROOT, load_weights, read_log, tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

from cache.store.segments import copy_cache
from distill.config.train_config import Config, StudentCfg
from distill.losses import DistillLoss, LossTermCfg, StudentOutput, TeacherBatch, teacher_logit_bias
from distill.losses.siglip import SIGLIP_INIT
from distill.train import train
from distill.training.build_run import build_student_model
from distill.training.grad_cache import grad_cache_step
from distill.training.student_model import DistillModel
from student import build_student
from student.export import export_checkpoint

SIGMA = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def _siglip(student, caption_ids=None, kwargs=None):
    loss = DistillLoss([LossTermCfg("siglip", "siglip", kwargs=kwargs or {})], [])
    return loss(student, None, caption_ids=caption_ids)["siglip"]


def _hand_siglip(img, txt, s, b, positive):
    """(1/n) sum_ij log(1 + exp(-z_ij (s x_i.y_j + b))), z = +1 on positives, -1 elsewhere."""
    n = len(img)
    tot = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if positive(i, j) else -1.0
            tot += math.log1p(math.exp(-z * (s * _dot(img[i], txt[j]) + b)))
    return tot / n


# Float32 bounds (test_losses' approach: references in float64, a bound is the float32 path's worst-case rounding;
# u = 2^-24). A pair's logit x = s a.b + b (unit a, b of d dims; |x| <= X = s + |b|) is within
# LX = logit_err(s, d) + X u (the bias's addition). -log sigmoid(+-x) has slope <= 1 and its own rounding
# (min(x, 0) - log1p(exp(-|x|))) <= (X + 3) u; a row sums n non-negative pairs and the term is a mean of rows:
# 2 n u of the value. Gradients: d/dx = (sigmoid(x) - y) / n is off by <= (LX / 4 + 2 u) / n (sigmoid' <= 1/4);
# a unit vector's component sums n of them times |y_k| <= 1 (rounding <= n u of their total <= 1), times s; the
# bias's sums all n^2 (total <= n: n^3 u), the scale's the same times a.b (off by d u).
def _lx(s: float, b: float, d: int) -> float:
    return logit_err(s, d) + (s + abs(b)) * U


def _siglip_tol(value: float, s: float, b: float, d: int, n: int) -> float:
    return n * (_lx(s, b, d) + (s + abs(b) + 3) * U) + 2 * n * U * abs(value)


def _siglip_grad_tol(key: str, s: float, b: float, d: int, n: int) -> float:
    pair = _lx(s, b, d) / 4 + 2 * U
    if key == "logit_bias":
        return n * pair + n**3 * U
    if key == "logit_scale":
        return n * (pair + d * U) + n**3 * U
    return s * (pair + n * U) + s * U


def _student(seed=0, scale=7.5, bias=-3.0, n=6):
    student, _ = make_batch(seed=seed, b=n)
    return StudentOutput(
        student.image.clone().requires_grad_(),
        student.text.clone().requires_grad_(),
        torch.tensor(scale, requires_grad=True),
        logit_bias=torch.tensor(bias, requires_grad=True),
    )


def test_siglip_equals_open_clip_and_the_hand_loop():
    st = _student(seed=1)
    got = _siglip(st)
    # open_clip on float64 copies (it computes in its input dtype) and the float64 loop: within _siglip_tol (3.9e-5
    # of 4.6; measured 1.8e-7); the scale off by 1% moves it by 4.4e-2, the bias by 0.01 by 4.6e-3
    ref = SigLipLoss()(*(t.detach().double() for t in (st.image, st.text, st.logit_scale, st.logit_bias))).item()
    hand = _hand_siglip(st.image.detach(), st.text.detach(), 7.5, -3.0, lambda i, j: i == j)
    tol = _siglip_tol(hand, 7.5, -3.0, BATCH_E, 6)
    assert got.item() == pytest.approx(ref, rel=0, abs=tol)
    assert got.item() == pytest.approx(hand, rel=0, abs=tol)
    # SigLIP's init (scale 10, bias -10): every negative costs ~e^-10, each positive ~10 - 10 cos
    init = _siglip(
        _student(seed=1, scale=math.exp(SIGLIP_INIT["init_logit_scale"]), bias=SIGLIP_INIT["init_logit_bias"])
    )
    assert 5 < init.item() < 20


def test_siglip_gradients_equal_open_clip_and_the_closed_form_bias_gradient():
    ours, ref = _student(seed=2), _student(seed=2)
    _siglip(ours).backward()
    keys = ("image", "text", "logit_scale", "logit_bias")
    leaves = [getattr(ref, k).detach().double().requires_grad_() for k in keys]
    SigLipLoss()(*leaves).backward()
    # ours (float32) against open_clip on float64 copies: within _siglip_grad_tol (1.4e-5 to 2.4e-5, of gradients
    # 0.5 to 1.6; measured <= 1.5e-7); the scale or the bias off by 1% moves them by >= 5.6e-3
    for k, r in zip(keys, leaves):
        g = getattr(ours, k).grad
        torch.testing.assert_close(g.double(), r.grad, rtol=0, atol=_siglip_grad_tol(k, 7.5, -3.0, BATCH_E, 6), msg=k)
        assert g.abs().sum() > 0, k
    # dL/db = (1/n) sum_ij (sigmoid(l_ij) - y_ij), y = 1 on the diagonal: SigLIP's bias moves to balance the pairs
    n, s, b = 6, 7.5, -3.0
    img, txt = ours.image.detach(), ours.text.detach()
    want = sum(SIGMA(s * _dot(img[i], txt[j]) + b) - (i == j) for i in range(n) for j in range(n)) / n
    tol = _siglip_grad_tol("logit_bias", s, b, BATCH_E, n)
    assert ours.logit_bias.grad.item() == pytest.approx(want, rel=0, abs=tol)


def test_siglip_caption_positives_by_hand():
    st = _student(seed=3, n=8)
    ids = CAPTION_IDS  # rows 0, 2, 6 share a caption, 1 and 4, 3 and 7
    got = _siglip(st, ids, {"positives": "caption"})
    hand = _hand_siglip(st.image.detach(), st.text.detach(), 7.5, -3.0, lambda i, j: bool(ids[i] == ids[j]))
    # within _siglip_tol (5.5e-5 of 8.2; measured 2.7e-7); diagonal positives instead: 3.7 off (below)
    assert got.item() == pytest.approx(hand, rel=0, abs=_siglip_tol(hand, 7.5, -3.0, BATCH_E, 8))
    assert got.item() != pytest.approx(_siglip(st).item(), rel=1e-3)


def test_siglip_needs_the_students_bias_and_says_so():
    st = _student()
    with pytest.raises(ValueError, match="student's logit bias"):
        _siglip(StudentOutput(st.image, st.text, st.logit_scale))
    with pytest.raises(ValueError, match="positives"):
        LossTermCfg("s", "siglip", kwargs={"positives": "rows"})


# ---------------------------------------------------------------------------------------------- sigmoid affinity


def _hand_sigmoid_affinity(student, teachers, t, t_bias, s, b, kl=False):
    """Both directions, each pair's binary cross-entropy of the student's sigmoid from the teacher's, row sums."""
    n, ts = len(student.image), teachers.logit_scale[t]
    tot = 0.0
    for mine, other in (("image", "text"), ("text", "image")):
        si, sj = getattr(student, mine), getattr(student, other)
        ti, tj = teachers.feats[t][mine], teachers.feats[t][other]
        for i in range(n):
            for j in range(n):
                x_t, x_s = ts * _dot(ti[i], tj[j]) + t_bias, s * _dot(si[i], sj[j]) + b
                p = SIGMA(x_t)  # 1 - sigmoid(x) = sigmoid(-x): no log(0) for a confident teacher
                tot += -(p * math.log(SIGMA(x_s)) + (1 - p) * math.log(SIGMA(-x_s))) / 2
                if kl:
                    tot += (p * math.log(p) + SIGMA(-x_t) * math.log(SIGMA(-x_t))) / 2
    return tot / n


@pytest.mark.parametrize("kl", [False, True])
def test_affinity_from_a_sigmoid_teacher_by_hand(kl):
    """Teacher a has a logit bias (sigmoid targets), b has none (softmax rows as before), weights 2:1."""
    student, teachers = make_batch(seed=7)
    student.logit_bias = torch.tensor(-4.0)
    teachers.logit_bias = {"a": -6.0}
    loss = DistillLoss([LossTermCfg("aff", "affinity", teachers={"a": 2.0, "b": 1.0}, kwargs={"kl": kl})], ["a", "b"])
    got = loss(student, teachers)["aff"].item()
    v_a = _hand_sigmoid_affinity(student, teachers, "a", -6.0, 14.0, -4.0, kl)
    v_b = _hand_affinity(student, teachers, "b", kl=kl)
    want = 2 / 3 * v_a + 1 / 3 * v_b
    # each teacher's part within its bound (test_losses.sigmoid_aff_tol, aff_tol): 6.7e-4 and 9.3e-4 of 12 (measured
    # <= 3.8e-7); the student's scale or bias off by 1% moves teacher a's part by >= 3e-2, its own bias off by 10%
    # by >= 4e-3
    tol = (
        2 / 3 * sigmoid_aff_tol(v_a, 14.0, -4.0, BATCH_E, SCALES["a"], -6.0, DIMS["a"], 6, kl)
        + 1 / 3 * aff_tol(v_b, 14.0, BATCH_E, SCALES["b"], DIMS["b"], 6, kl)
        + 4 * U * abs(want)
    )
    assert got == pytest.approx(want, rel=0, abs=tol)
    assert loss.uses_logit_bias({"a": -6.0, "b": None}) and not loss.uses_logit_bias({"b": None})


def test_sigmoid_affinity_is_zero_at_a_perfect_match_under_kl():
    """A student equal to its teacher (same features, scale and bias) has KL 0, and a zero gradient."""
    student, teachers = make_batch(seed=8, dims={"a": 8})
    f = teachers.feats["a"]
    img, txt = f.image.clone().requires_grad_(), f.text.clone().requires_grad_()
    st = StudentOutput(img, txt, torch.tensor(30.0), logit_bias=torch.tensor(-5.0))
    teachers.logit_scale, teachers.logit_bias = {"a": 30.0}, {"a": -5.0}
    out = DistillLoss([LossTermCfg("aff", "affinity", kwargs={"kl": True})], ["a"])(st, teachers)["aff"]
    out.backward()
    assert abs(out.item()) < 1e-5 and img.grad.abs().max() < 1e-5


def test_teacher_logit_bias_reads_the_cache_attr():
    assert teacher_logit_bias({"logit_scale": 100.0}) is None
    assert teacher_logit_bias({"logit_bias": float("nan")}) is None
    assert teacher_logit_bias({"logit_bias": np.float32(-16.5)}) == -16.5


# ---------------------------------------------------------------------------------------------- 2 processes = 1

TERMS = [
    LossTermCfg("siglip", "siglip"),
    LossTermCfg("siglip_cap", "siglip", 0.5, kwargs={"positives": "caption"}),
    LossTermCfg("infonce", "infonce"),
    LossTermCfg("aff", "affinity", 2.0, kwargs={"kl": True}),  # a: sigmoid teacher, b: softmax teacher
]
GRADS = ("image", "text", "logit_scale", "logit_bias")

# Float32 bounds of "2 processes == 1" (summation order only; each run within its worst-case rounding of the exact
# values, so the two within twice that; derivations at test_losses.logit_err / ce_err / nce_grad_err, u = 2^-24).
# Student logits s x a.b + b, s = 12, |b| = 2, unit vectors of E = 6: within LS = logit_err(12, 6) + 14 u; teacher
# a's (sigmoid) s_t = 40, |b_t| = 3, d = 3: LA = logit_err(40, 3) + 43 u; teacher b's (softmax) s_t = 90, d = 5: LB.
# Per pair, -log sigmoid has derivative <= 1 in its logit (sigmoid' <= 1/4 in the gradients' sigmoid); the sigmoid
# KL's derivative in the teacher logit, sigmoid'(L_t)(L_t - L_s), is <= 0.23 + |L_s| / 4 <= 3.8. A row sums N pairs,
# and the sigmoid KL subtracts two row sums of size <= N x 57 (|logits| <= 14 + 43): (N + 4) u each. The softmax
# teacher's KL moves by <= 2 LS + 2 LB (2 log N + KL) (its derivative in the teacher logits: p (log p - log q - KL),
# l1 <= 2 (H + CE)). Gradients: each unit vector is in N pairs as a row and N as a column (both terms' directions),
# every pair's derivative off by <= (its logits' errors) / 4 + 2 u (sigmoid terms) or as nce_grad_err (softmax
# terms), times s. These are <= 3e-4 of the values (6 to 59) and of the gradients (3 to 11; the scale's and bias's
# 1e-4 of 3 to 5), measured <= 2e-6; a missing gather moves siglip by 1.2, a bias gradient not summed over ranks
# by 1.2.
LS = logit_err(12.0, E) + 14 * U
LA, LB = logit_err(40.0, DIMS["a"]) + 43 * U, logit_err(90.0, DIMS["b"])


def _value_tol(key: str, value: float) -> float:
    sig = N * LS + (N + 4) * U * abs(value)  # a mean of row sums of N non-negative pairs
    nce = 2 * LS + (4 * 12 + N + 6) * U + 2 * N * U * abs(value)
    aff_a = N * (LS + 3.8 * LA) + 2 * (N + 4) * U * N * 57
    aff_b = 2 * LS + 2 * LB * (2 * math.log(N) + abs(value)) + 2 * (4 * 102 + N + 6) * U
    per = {"siglip": sig, "siglip_cap": 0.5 * sig, "infonce": nce, "aff": 2 * 0.5 * (aff_a + aff_b)}
    per["loss"] = sum(per.values()) + 4 * U * abs(value)
    return 2 * per[key]


def _grad_tol(key: str) -> float:
    s = 12.0
    sig = s * (LS / 4 + 2 * U) + 4 * N * s * U  # N + N pairs of weight 1 / N, and their sums' rounding
    nce = s / (2 * N) * (N + 1) * (2 * LS + 4 * (N + 3) * U)
    aff = s * ((LS + LA) / 4 + 2 * U) / 2 + s / (2 * N) * (N + 1) * (2 * (LS + LB) + 4 * (N + 3) * U) / 2
    if key == "logit_bias":  # sum over the N^2 pairs of weight 1 / N: N x the per-pair error, and their rounding
        sig_b, aff_b = N * (LS / 4 + 2 * U) + N * N * U, N * ((LS + LA) / 4 + 2 * U) / 2
        return 2 * (1.5 * sig_b + 2 * aff_b)
    if key == "logit_scale":  # the same sums times |a.b| <= 1, and the softmax terms' 2N rows of weight 1 / 2N
        sig_b, aff_b = N * (LS / 4 + 2 * U) + N * N * U, N * ((LS + LA) / 4 + 2 * U) / 2
        return 2 * (1.5 * sig_b + 2 * aff_b + 2 * LS + (LS + LB) + 4 * (2 * N * N + E) * U)
    return 2 * (1.5 * sig + nce + 2 * aff)


def _run(rows: slice) -> dict[str, torch.Tensor]:
    """The loss terms ("out/K") and gradients ("grad/K") for these rows of the global batch."""
    leaves, feats = _global_batch()
    st = StudentOutput(
        leaves["image"][rows].clone().requires_grad_(),
        leaves["text"][rows].clone().requires_grad_(),
        torch.tensor(12.0, requires_grad=True),
        logit_bias=torch.tensor(-2.0, requires_grad=True),
    )
    teachers = TeacherBatch(
        {t: f.map(lambda v: v[rows]) for t, f in feats.items()}, {"a": 40.0, "b": 90.0}, logit_bias={"a": -3.0}
    )
    out = DistillLoss(TERMS, list(DIMS))(st, teachers, caption_ids=CAPTION_IDS[rows])
    out["loss"].backward()
    res = {f"out/{k}": v.detach() for k, v in out.items()}
    res.update({f"grad/{k}": getattr(st, k).grad for k in GRADS})
    return res


def _worker(rank: int, init_file: str, out_dir: str):
    with counting_gloo_group(rank, WORLD, init_file) as calls:
        b = N // WORLD
        res = _run(slice(rank * b, (rank + 1) * b))
        res["all_gathers"] = torch.tensor(calls[0])
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    ref = _run(slice(None))
    for k in [k for k in ref if k.startswith("out/")]:
        torch.testing.assert_close(
            sum(r[k] for r in ranks) / WORLD, ref[k], rtol=0, atol=_value_tol(k[len("out/") :], ref[k].item()), msg=k
        )
    # a rank's own value differs from the global one: a missing gather would show
    assert not torch.allclose(ranks[0]["out/siglip"], ref["out/siglip"], rtol=1e-3)
    for k in GRADS:
        got = (
            torch.cat([r[f"grad/{k}"] for r in ranks]) if k in ("image", "text") else sum(r[f"grad/{k}"] for r in ranks)
        ) / WORLD
        torch.testing.assert_close(got, ref[f"grad/{k}"], rtol=0, atol=_grad_tol(k), msg=f"gradient of {k}")
        assert ref[f"grad/{k}"].abs().sum() > 0
    # student image and text with gradient (siglip shares infonce's text gather) + one for teachers and caption ids
    assert [int(r["all_gathers"]) for r in ranks] == [3] * WORLD


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_siglip_training_falls_and_the_export_carries_the_bias(tiny_corpus, tmp_path):
    """configs/siglip.yaml on the tiny corpus: the loss falls below what the bias alone can reach."""
    out = tmp_path / "run"
    cfg = Config.from_yaml(
        ROOT / "configs" / "siglip.yaml",
        [f"data.corpus={tiny_corpus}", f"train.output_dir={out}", "train.checkpoint_every=60"],
    )
    assert [t.kind for t in cfg.terms] == ["siglip"] and cfg.train.max_steps == 60
    train(cfg)
    rows = read_log(out)
    first, last = np.mean([r["siglip"] for r in rows[:3]]), np.mean([r["siglip"] for r in rows[-10:]])
    # the best a bias alone can do with 8 rows (1 positive, 7 negatives, equal logits): -ln(1/8) - 7 ln(7/8) = 3.01;
    # below it the towers tell pairs apart
    assert first > 3.0 and last < 2.6, (first, last)
    w = load_weights(out / "checkpoint-60")
    bias, scale = w["student.logit_bias"].item(), w["student.logit_scale"].item()
    # both trained (the bias starts at its bias-only optimum for 8 rows, so it moves little)
    assert abs(bias + 2.0) > 1e-4 and scale != pytest.approx(math.log(10), abs=1e-3)

    exp = export_checkpoint(out / "checkpoint-60", tmp_path / "export")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exp}")
    assert model.logit_bias.item() == pytest.approx(bias) and model.logit_scale.item() == pytest.approx(scale)


def test_a_loss_that_reads_the_bias_gives_the_student_siglips_init(tiny_tokenizer, tmp_path):
    def built(logit_bias, **overrides):
        s = StudentCfg(preset="tiny", tokenizer_dir=str(tiny_tokenizer), overrides=overrides)
        return build_student_model(s, tmp_path / f"s{len(list(tmp_path.iterdir()))}", str(tiny_tokenizer), logit_bias)

    b = built(True)
    assert b.model.logit_bias.item() == -10.0 and b.model.logit_scale.item() == pytest.approx(math.log(10))
    assert b.model_cfg["init_logit_bias"] == -10.0  # what the export's open_clip_config.json carries
    assert built(True, init_logit_bias=-2.0).model.logit_bias.item() == -2.0  # student.overrides win
    plain = built(False).model
    assert plain.logit_bias is None and plain.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with pytest.raises(ValueError, match="student's logit bias.*has none"):
        DistillModel(plain).freeze_unreached(True, {}, uses_logit_bias=True)
    model = DistillModel(b.model)
    assert "student.logit_bias" in model.freeze_unreached(True, {}) and not model.student.logit_bias.requires_grad
    model.student.logit_bias.requires_grad_(True)
    assert "student.logit_bias" not in model.freeze_unreached(True, {}, uses_logit_bias=True)


@pytest.mark.parametrize("micro", [3, 8])
def test_micro_batches_give_the_bias_the_gradient_of_one_forward(tiny_tokenizer, tmp_path, micro):
    """Gradient caching treats the logit bias like the scale: one value per batch, its gradient sent once."""
    torch.manual_seed(0)
    bundle = build_student(
        "tiny", tmp_path / "student", tokenizer_dir=tiny_tokenizer, init_logit_bias=-3.0, **NO_DROPOUT
    )
    # float64 model, as in test_grad_cache (FP64_TOL's derivation there): the chunked and the whole-batch backward
    # differ only in summation order, which in float32 is up to the CPU's kernels (AVX2 vs AVX-512) and exceeded a
    # 1e-6 bound on an AMD machine; in float64 it is ~1e-13, while a bias gradient sent per chunk is off by >= 1e-3
    model = DistillModel(bundle.model).train().to(torch.float64)
    loss = DistillLoss([LossTermCfg("siglip", "siglip"), LossTermCfg("infonce", "infonce")], [])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = bundle.tokenizer([f"organ {i}" for i in range(8)])
    out = model(images, tokens)
    assert out.image.dtype == out.logit_bias.dtype == torch.float64  # the towers ran in float64
    ref = loss(out, None)
    ref["loss"].backward()
    want = _grads(model)
    assert want["student.logit_bias"].abs().item() > 0
    got = grad_cache_step(model, images, tokens, micro, lambda st: loss(st, None), lambda x: x.backward())
    assert got["siglip"].item() == pytest.approx(ref["siglip"].item(), rel=FP64_TOL, abs=FP64_TOL)
    _assert_equal(_grads(model), want, atol=FP64_TOL)


@pytest.mark.slow
def test_affinity_from_a_sigmoid_teacher_trains_the_students_bias(tiny_corpus, tiny_cache, tmp_path):
    cache = tmp_path / "features.h5"
    copy_cache(str(tiny_cache), str(cache))  # the file and its segment folder
    with h5py.File(cache, "r+") as f:
        f["teachers/oc"].attrs["logit_bias"] = -5.0  # as the cache records a sigmoid (SigLIP) teacher
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_corpus,
        out,
        cache,
        mode="distill",
        train__max_steps=20,
        train__checkpoint_every=20,
        loss__terms="[{kind: affinity, teachers: {oc: 1.0}, kwargs: {kl: true}}]",
    )
    train(cfg)
    rows = read_log(out)
    first, last = np.mean([r["affinity"] for r in rows[:3]]), np.mean([r["affinity"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    bias = load_weights(out / "checkpoint-20")["student.logit_bias"].item()
    assert bias > SIGLIP_INIT["init_logit_bias"] + 0.01  # SigLIP's init, then moved towards the teacher's -5
