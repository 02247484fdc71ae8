"""Domain-local distillation (issue 17, item 2): `scope: domain` in affinity and the confidence weights, affinity's
`positives: caption`, per-domain term weights (`loss.routing.weights`), and how domain ids reach the loss.

Every expected value is computed by hand below with plain torch softmaxes over explicit column lists (float64),
independently of the masking the terms use.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_helpers import counting_gloo_group
from test_losses import U, aff_tol, logit_err, nce_grad_err, nce_tol, sigmoid_aff_tol
from train_fixtures import tiny_cache, tiny_config, tiny_tokenizer  # noqa: F401  (fixtures)

from cache.sources.corpus import open_corpus
from distill.config.train_config import Config, ConfigError, DataCfg, RoutingCfg
from distill.data.cache_join import route_mask
from distill.data.loader import Collate, DataError
from distill.losses import CombineCfg, DistillLoss, LossTermCfg, StepContext, StudentOutput, TeacherBatch
from distill.losses.distributed import StepGather
from distill.losses.terms import Affinity
from distill.train import make_accelerator, train
from distill.training.build_run import build_run, teacher_batch
from distill.training.grad_cache import merge_batches
from distill.training.routing import loss_domains
from teachers.kernel.modality import Pair

N, E, D = 6, 4, 3
DOMAINS = torch.tensor([0, 1, 0, 2, 1, 0])  # row 3 is alone in its domain
CAPTIONS = torch.tensor([7, 8, 7, 9, 7, 6])  # rows 0, 2 (same domain) and 4 (another domain) share a caption
S_SCALE, T_SCALES = 10.0, {"a": 20.0, "b": 35.0}


def _feats(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # float64 values that float32 holds exactly: the terms (float32 inputs) and the hand values see the same numbers
    unit = lambda d: F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).float().double()  # noqa
    student = {"image": unit(E), "text": unit(E)}
    teachers = {t: {"image": unit(D), "text": unit(D)} for t in T_SCALES}
    return student, teachers


def _batch(student, teachers, domains=None, row_weights=None, bias=None, rows=slice(None), grad=False):
    leaves = {k: v[rows].float().clone().requires_grad_(grad) for k, v in student.items()}
    out = StudentOutput(
        leaves["image"],
        leaves["text"],
        torch.tensor(S_SCALE),
        logit_bias=None if bias is None else torch.tensor(bias[0]),
    )
    tb = TeacherBatch(
        {t: Pair(f["image"][rows].float(), f["text"][rows].float()) for t, f in teachers.items()},
        dict(T_SCALES),
        logit_bias={} if bias is None else {t: bias[1] for t in T_SCALES},
        domains=None if domains is None else domains[rows],
        row_weights=None if row_weights is None else row_weights[rows],
    )
    return out, tb, leaves


def _ctx(student_out, tb, captions=None):
    return StepContext(
        student_out,
        tb,
        StepGather(lambda x, with_grad: (x, 0)),
        caption_ids=captions,
        gathers_domains=tb.domains is not None,
    )


def _within(got: torch.Tensor, want: torch.Tensor, tol, msg: str = "") -> None:
    """|got - want| <= tol elementwise (tol a float or a tensor of want's shape), got float32, want float64."""
    diff = (got.detach().double() - want).abs()
    assert (diff <= tol).all(), (msg, diff.max().item(), tol)


def _aff_tol(value, teacher: str, kl: bool = False):
    """test_losses.aff_tol for these batches: unit float32 features of E (student) and D (teacher) dims, N columns
    (or fewer: a row's domain), caption classes included."""
    return aff_tol(value, S_SCALE, E, T_SCALES[teacher], D, N, kl)


def _columns(i: int, domains) -> list[int]:
    return [j for j in range(N) if domains is None or int(domains[j]) == int(domains[i])]


def _hand_affinity(student, teacher, t_scale, domains=None, captions=None, kl=False) -> torch.Tensor:
    """(N,) per-row affinity: for each row, plain softmaxes over the listed columns, merged into caption classes
    when `captions` is given, cross-entropy (or KL) of the student's from the teacher's; directions averaged."""
    vals = []
    for i in range(N):
        cols = _columns(i, domains)
        per_dir = []
        for mine, other in (("image", "text"), ("text", "image")):
            p_s = torch.softmax(S_SCALE * student[mine][i] @ student[other][cols].T, 0)
            p_t = torch.softmax(t_scale * teacher[mine][i] @ teacher[other][cols].T, 0)
            if captions is not None:
                classes = sorted({int(captions[j]) for j in cols})

                def merge(p, cols=cols, classes=classes):  # called at once, in this iteration
                    return torch.stack(
                        [sum(p[k] for k, j in enumerate(cols) if int(captions[j]) == c) for c in classes]
                    )

                p_s, p_t = merge(p_s), merge(p_t)
            v = -(p_t * p_s.log()).sum()
            per_dir.append(v + (p_t * p_t.log()).sum() if kl else v)
        vals.append((per_dir[0] + per_dir[1]) / 2)
    return torch.stack(vals)


def _hand_confidence(teacher, t_scale, domains=None, captions=None) -> torch.Tensor:
    """(N,) p_i: the teacher's softmax mass (over the row's columns) on row i's pair, or on every row with its
    caption, averaged over the two directions."""
    out = []
    for i in range(N):
        cols = _columns(i, domains)
        pos = [k for k, j in enumerate(cols) if (j == i if captions is None else int(captions[j]) == int(captions[i]))]
        ps = [
            torch.softmax(t_scale * teacher[m][i] @ teacher[o][cols].T, 0)[pos].sum()
            for m, o in (("image", "text"), ("text", "image"))
        ]
        out.append((ps[0] + ps[1]) / 2)
    return torch.stack(out)


# -- the domain-local distribution, by hand ------------------------------------------------------------------------
@pytest.mark.parametrize("kl", [False, True])
def test_domain_scope_affinity_equals_the_hand_computed_domain_softmax(kl):
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers, DOMAINS)
    got = Affinity(kl=kl, scope="domain").per_sample(_ctx(out, tb), "a")
    want = _hand_affinity(student, teachers["a"], T_SCALES["a"], DOMAINS, kl=kl)
    # float32 rows against float64 softmaxes: each within aff_tol of its own value (1.4e-5 to 4.9e-4, of values up
    # to 11; measured <= 1.2e-6); the batch-wide distribution instead moves every row by >= 0.21
    _within(got, want, _aff_tol(want, "a", kl))
    assert got[3] == 0  # alone in its domain: a one-point distribution, exactly 0
    # it is not the batch-wide value (the test would notice a mask that does nothing)
    batch = _hand_affinity(student, teachers["a"], T_SCALES["a"], kl=kl)
    assert not torch.allclose(want, batch, rtol=1e-2)
    # through DistillLoss: the term is weight x the batch mean of the rows
    loss = DistillLoss([LossTermCfg("aff", "affinity", 3.0, {"a": 1.0}, {"scope": "domain", "kl": kl})], ["a", "b"])
    assert loss.uses_domains and not loss.uses_caption_ids
    _within(loss(out, tb)["aff"], 3.0 * want.mean(), 3.0 * _aff_tol(want.mean().item(), "a", kl))


def test_batch_scope_is_unchanged_and_bit_identical_to_the_default():
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers, DOMAINS)
    ctx = _ctx(out, tb)
    default = Affinity().per_sample(ctx, "b")
    assert torch.equal(Affinity(scope="batch", positives="diagonal").per_sample(ctx, "b"), default)
    want = _hand_affinity(student, teachers["b"], T_SCALES["b"])
    _within(default, want, _aff_tol(want, "b"))  # <= 5.6e-4 of values up to 13 (measured 6.9e-7)
    # a batch without domains gives the same (the default never reads them)
    out2, tb2, _ = _batch(student, teachers)
    assert torch.equal(Affinity().per_sample(_ctx(out2, tb2), "b"), default)


def test_caption_positives_in_affinity_equal_the_hand_class_distribution():
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers, DOMAINS)
    for scope, dom in (("batch", None), ("domain", DOMAINS)):
        got = Affinity(scope=scope, positives="caption").per_sample(_ctx(out, tb, CAPTIONS), "a")
        want = _hand_affinity(student, teachers["a"], T_SCALES["a"], dom, CAPTIONS)
        _within(got, want, _aff_tol(want, "a"), scope)  # <= 2.7e-4 (measured 9.4e-7); diagonal: up to 11
    # merging rows 0, 2 and 4 changes the value (all-distinct captions would not)
    diag = _hand_affinity(student, teachers["a"], T_SCALES["a"])
    assert not torch.allclose(want, diag, rtol=1e-2)
    loss = DistillLoss([LossTermCfg("aff", "affinity", kwargs={"positives": "caption"})], ["a"])
    assert loss.uses_caption_ids and not loss.uses_domains


def test_caption_positives_gradient_is_finite_with_masked_classes():
    """Classes that a row's domain does not hold are -inf in both distributions: no NaN reaches the gradient."""
    student, teachers = _feats()
    out, tb, leaves = _batch(student, teachers, DOMAINS, grad=True)
    Affinity(scope="domain", positives="caption").per_sample(_ctx(out, tb, CAPTIONS), "a").sum().backward()
    for k, v in leaves.items():
        assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, k


def test_sigmoid_teacher_domain_scope_sums_same_domain_pairs_only():
    student, teachers = _feats()
    b_s, b_t = -3.0, -5.0
    out, tb, _ = _batch(student, teachers, DOMAINS, bias=(b_s, b_t))
    got = Affinity(scope="domain").per_sample(_ctx(out, tb), "a")
    want = []
    for i in range(N):
        cols = _columns(i, DOMAINS)
        v = 0
        for m, o in (("image", "text"), ("text", "image")):
            x_s = S_SCALE * student[m][i] @ student[o][cols].T + b_s
            p_t = torch.sigmoid(T_SCALES["a"] * teachers["a"][m][i] @ teachers["a"][o][cols].T + b_t)
            v = v + F.binary_cross_entropy_with_logits(x_s, p_t, reduction="sum") / 2
        want.append(v)
    # each row within sigmoid_aff_tol of its value (2e-4, of values up to 12; measured 9e-7); the other domains'
    # pairs kept would move every row by >= 3.5
    want = torch.stack(want)
    _within(got, want, sigmoid_aff_tol(want, S_SCALE, b_s, E, T_SCALES["a"], b_t, D, N))


def test_confidence_weights_with_domain_scope_and_caption_positives_by_hand():
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers, DOMAINS)
    ctx = _ctx(out, tb, CAPTIONS)
    for scope, positives in (
        ("batch", "diagonal"),
        ("domain", "diagonal"),
        ("batch", "caption"),
        ("domain", "caption"),
    ):
        dom = DOMAINS if scope == "domain" else None
        cap = CAPTIONS if positives == "caption" else None
        want = _hand_confidence(teachers["a"], T_SCALES["a"], dom, cap)
        torch.testing.assert_close(ctx.log_confidence("a", scope, positives).exp(), want, rtol=1e-9, atol=1e-12)
    assert ctx.log_confidence("a", "domain")[3] == 0  # alone: p = 1 for every teacher, the weights are the priors
    # wired through loss.combine: per-sample weights w_it ~ p_it^(1/T) over the two teachers
    combine = CombineCfg(mode="confidence", temperature=0.5, scope="domain", positives="caption")
    loss = DistillLoss([LossTermCfg("aff", "affinity")], ["a", "b"], combine)
    assert loss.uses_domains and loss.uses_caption_ids
    p = torch.stack([_hand_confidence(teachers[t], T_SCALES[t], DOMAINS, CAPTIONS) for t in ("a", "b")], 1) ** 2
    w = p / p.sum(1, keepdim=True)
    per = torch.stack([_hand_affinity(student, teachers[t], T_SCALES[t]) for t in ("a", "b")], 1)
    got = loss(out, tb, caption_ids=CAPTIONS)["aff"]
    # rows mix the two teachers' with weights summing to 1 (float64, rounded once): within the worse teacher's
    # aff_tol at its largest row (5.6e-4 of 8.7; measured 8.5e-7); batch-scope diagonal weights move it by >= 1e-3
    # relative (below), teacher b's scale off by 10% its rows by up to 8e-2
    want = (w * per).sum(1).mean()
    _within(got, want, max(_aff_tol(per[:, k].max().item(), t) for k, t in enumerate("ab")) + 4 * U * want.item())
    # the batch-scope, diagonal confidence weights give another value
    plain = DistillLoss([LossTermCfg("aff", "affinity")], ["a", "b"], CombineCfg(mode="confidence", temperature=0.5))
    assert not torch.allclose(plain(out, tb)["aff"], got, rtol=1e-3)


# -- per-domain weights ------------------------------------------------------------------------------------------
def test_row_weights_scale_each_rows_teacher_terms_exactly_and_not_infonce():
    student, teachers = _feats()
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0, 1.0])
    terms = [
        LossTermCfg("infonce", "infonce"),
        LossTermCfg("aff", "affinity", 2.0, {"a": 1.0}),
        LossTermCfg("feat", "feature", 1.0, {"b": 1.0}),
    ]
    student_out, plain_tb, _ = _batch(student, teachers)
    student_out.projected = {
        t: Pair(
            torch.randn(N, D, generator=torch.Generator().manual_seed(3)),
            torch.randn(N, D, generator=torch.Generator().manual_seed(4)),
        )
        for t in T_SCALES
    }
    _, weighted_tb, _ = _batch(student, teachers, row_weights=w)
    loss = DistillLoss(terms, ["a", "b"])
    plain, weighted = loss(student_out, plain_tb), loss(student_out, weighted_tb)
    assert torch.equal(plain["infonce"], weighted["infonce"])
    ctx = _ctx(student_out, plain_tb)
    aff = Affinity().per_sample(ctx, "a")
    torch.testing.assert_close(weighted["aff"], 2.0 * (w * aff).mean())
    feat = loss.terms["feat"].per_sample(ctx, "b")
    torch.testing.assert_close(weighted["feat"], (w * feat).mean())
    # all-ones weights are the unweighted loss
    _, ones_tb, _ = _batch(student, teachers, row_weights=torch.ones(N))
    torch.testing.assert_close(loss(student_out, ones_tb)["loss"], plain["loss"])


@pytest.fixture()
def domain_corpus(tmp_path) -> Path:
    path = tmp_path / "c.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "site"])
        w.writerows([["a.png", "x", "breast"], ["b.png", "y", "derm"], ["c.png", "z", "breast"]])
    return path


def test_routing_weights_by_column_value_and_their_errors(domain_corpus):
    corpus = open_corpus(domain_corpus)
    r = route_mask(
        RoutingCfg(column="site", teachers={"breast": ("oc",), "derm": ("oc",)}, weights={"breast": 4.0}),
        corpus,
        ["oc"],
        ["oc"],
    )
    assert r.row_weights.tolist() == [4.0, 1.0, 4.0] and r.row_weights.dtype == np.float32
    assert route_mask(RoutingCfg(column="site", teachers={"derm": ("oc",)}), corpus, ["oc"], ["oc"]).row_weights is None
    with pytest.raises(
        DataError,
        match=r"loss\.routing\.weights names value\(s\) \['brest'\] that column 'site' of "
        r".*c\.csv never holds \(its values: 'breast', 'derm'\)",
    ):
        route_mask(
            RoutingCfg(column="site", teachers={"derm": ("oc",)}, weights={"brest": 2.0}), corpus, ["oc"], ["oc"]
        )


# -- how domain ids reach the loss, and the errors ----------------------------------------------------------------
def test_domains_and_row_weights_travel_from_collate_to_the_loss(domain_corpus):
    collate = Collate(
        lambda caps: torch.zeros(len(caps), 3, dtype=torch.long),
        domains=np.array([1, 0, 1]),
        row_weights=np.array([4.0, 1.0, 4.0], dtype=np.float32),
    )
    items = [
        {"caption": "x", "row": r, "cache_row": r, "view": -1, "image": torch.zeros(3, 2, 2, dtype=torch.uint8)}
        for r in (2, 1)
    ]
    b = collate(items)
    assert b.domains.tolist() == [1, 0] and b.domains.dtype == torch.int64
    assert b.row_weights.tolist() == [4.0, 1.0] and b.to("cpu").domains.tolist() == [1, 0]
    merged = merge_batches([b, collate(items[:1])], pad_id=0)
    assert merged.domains.tolist() == [1, 0, 1] and merged.row_weights.tolist() == [4.0, 1.0, 4.0]
    b.teacher_feats = {"oc": Pair(torch.zeros(2, 3), torch.zeros(2, 3))}
    tb = teacher_batch(b, {"oc": 10.0}, ["oc"])
    assert tb.domains is b.domains and tb.row_weights is b.row_weights

    corpus = open_corpus(domain_corpus)
    scoped = DistillLoss([LossTermCfg("aff", "affinity", kwargs={"scope": "domain"})], ["oc"])
    assert loss_domains(DataCfg(domain_column="site"), scoped.uses_domains, corpus, None).tolist() == [0, 1, 0]
    assert loss_domains(None, DistillLoss([LossTermCfg("aff", "affinity")], ["oc"]).uses_domains, corpus, None) is None
    with pytest.raises(
        DataError,
        match=r"^scope: domain \(a loss term's kwargs or loss\.combine\.scope\) needs each "
        r"row's domain: data\.domain_column='domain': .*has no column 'domain'",
    ):
        loss_domains(DataCfg(), scoped.uses_domains, corpus, None)


def test_domain_scope_without_domain_ids_is_refused_in_one_line():
    student, teachers = _feats()
    out, tb, _ = _batch(student, teachers)
    loss = DistillLoss([LossTermCfg("aff", "affinity", kwargs={"scope": "domain"})], ["a"])
    with pytest.raises(ValueError, match=r"scope='domain', but the batch carries no domain ids"):
        loss(out, tb)


def _cfg(**loss) -> Config:
    return Config.from_dict({"mode": "distill", "data": {"corpus": "c.csv", "features": "f.h5"}, "loss": loss})


def test_config_errors_name_the_key():
    with pytest.raises(
        ConfigError,
        match=r"loss\.terms.*affinity scope 'global' is unknown; use one of batch, "
        r"domain",
    ):
        _cfg(terms=[{"kind": "affinity", "kwargs": {"scope": "global"}}])
    with pytest.raises(ConfigError, match=r"loss\.terms.*affinity positives 'row' is unknown"):
        _cfg(terms=[{"kind": "affinity", "kwargs": {"positives": "row"}}])
    with pytest.raises(ConfigError, match=r"loss\.combine\.scope=domain applies to mode=confidence only"):
        _cfg(combine={"scope": "domain"})
    with pytest.raises(ConfigError, match=r"loss\.combine\.positives=caption applies to mode=confidence only"):
        _cfg(combine={"mode": "random_teacher", "positives": "caption"})
    with pytest.raises(ConfigError, match=r"loss\.combine.*scope 'rows' is unknown; use one of batch, domain"):
        _cfg(combine={"mode": "confidence", "scope": "rows"})
    with pytest.raises(ConfigError, match=r"loss\.routing\.weights\.breast must be a finite number >= 0, got -1"):
        _cfg(routing={"column": "domain", "default": ["a"], "weights": {"breast": -1}})
    ok = _cfg(
        terms=[{"kind": "affinity", "kwargs": {"scope": "domain", "positives": "caption"}}],
        combine={"mode": "confidence", "scope": "domain", "positives": "caption"},
        routing={"column": "domain", "default": ["a"], "weights": {"breast": 3}},
    )
    assert ok.loss.routing.weights == {"breast": 3.0} and ok.loss.combine.scope == "domain"


# -- two processes equal one ---------------------------------------------------------------------------------------
WORLD = 2
DIST_DOMAINS = torch.tensor([0, 1, 0, 2, 1, 0])  # rows 0-2 on rank 0, 3-5 on rank 1: domains span both halves
DIST_W = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
DIST_TERMS = [
    LossTermCfg("infonce", "infonce"),
    LossTermCfg("aff", "affinity", kwargs={"scope": "domain", "positives": "caption"}),
    LossTermCfg("aff_kl", "affinity", 0.5, {"b": 1.0}, {"scope": "domain", "kl": True}),
]
DIST_COMBINE = CombineCfg(mode="confidence", scope="domain", positives="caption")

# Float32 bounds of "2 processes == 1": the same float32 arithmetic in another order (a rank's rows against the
# gathered batch, gradients summed into their owner, means per rank then over ranks; the confidence weights are
# float64, rounded once), each run within its worst-case rounding of the exact values, so the two within twice that
# (test_losses' nce_tol, aff_tol, nce_grad_err; unit features, student scale 10 over E = 4, teachers' <= 35 over
# D = 3). Affinity rows carry the row weights DIST_W (mean R_MEAN, at most R_MAX) times confidence mixes summing to
# 1, so a term's bound is R_MEAN x aff_tol at its value (aff_tol is affine in it, its slope term applying to the
# weighted value itself). A gradient component of a student row: infonce's nce_grad_err, and each affinity term's
# weight x R_MAX x (s / 2N)(N + 1) x (the l1 error of a row of q - P/Q q, the student's softmax minus the teacher's
# class mass spread by the student's within-class shares: 2 LS + 2 LT, the rows' totals <= 1, a column's <= N, and
# 8 (N + 3) u of rounding). These are 3.8e-5 to 1.8e-3 of values 3.9 to 24 and 1.8e-3 of gradients up to 9.7
# (measured <= 1.9e-6); ranks left to their own rows (a missing gather, of features or domain ids) move infonce
# by 2.8 and the affinity terms by >= 3.9.
R_MEAN, R_MAX = DIST_W.mean().item(), DIST_W.max().item()
LS, LT = logit_err(S_SCALE, E), logit_err(max(T_SCALES.values()), D)


def _dist_value_tol(key: str, values: dict[str, float]) -> float:
    """|1 process - 2 processes| of term `key` (values: the terms' values, weights included; "loss" their sum)."""
    per = {
        "infonce": lambda v: nce_tol(v, S_SCALE, E, N),
        "aff": lambda v: R_MEAN * _aff_tol(v, "b"),  # the larger teacher scale bounds both teachers
        "aff_kl": lambda v: 0.5 * R_MEAN * _aff_tol(v / 0.5, "b", kl=True),
    }
    if key == "loss":
        return 2 * (sum(f(values[k]) for k, f in per.items()) + 4 * U * values["loss"])
    return 2 * per[key](values[key])


def _dist_grad_tol() -> float:
    aff = S_SCALE / (2 * N) * (N + 1) * (2 * LS + 2 * LT + 8 * (N + 3) * U)
    return 2 * (nce_grad_err(S_SCALE, E, N) + (1.0 + 0.5) * R_MAX * aff)


def _dist_run(rows: slice):
    student, teachers = _feats()
    out, tb, leaves = _batch(student, teachers, DIST_DOMAINS, DIST_W, rows=rows, grad=True)
    loss = DistillLoss(DIST_TERMS, ["a", "b"], DIST_COMBINE)
    res = loss(out, tb, caption_ids=CAPTIONS[rows])
    res["loss"].backward()
    return {k: v.detach() for k, v in res.items()}, {k: v.grad for k, v in leaves.items()}


def _dist_worker(rank: int, init_file: str, out_dir: str):
    with counting_gloo_group(rank, WORLD, init_file) as calls:
        half = N // WORLD
        calls[0] = 0
        out, grads = _dist_run(slice(rank * half, (rank + 1) * half))
        torch.save(
            {"out": out, "grads": grads, "gathers": torch.tensor(calls[0])}, os.path.join(out_dir, f"r{rank}.pt")
        )


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    ref_out, ref_grads = _dist_run(slice(None))
    values = {k: v.item() for k, v in ref_out.items()}
    for k, v in ref_out.items():
        torch.testing.assert_close(
            sum(r["out"][k] for r in ranks) / WORLD, v, rtol=0, atol=_dist_value_tol(k, values), msg=k
        )
    for k, g in ref_grads.items():
        torch.testing.assert_close(
            torch.cat([r["grads"][k] for r in ranks]) / WORLD, g, rtol=0, atol=_dist_grad_tol(), msg=k
        )
        assert g.abs().sum() > 0
    # student image and text (with gradient), then ONE gather for teachers, caption ids and domain ids
    assert [int(r["gathers"]) for r in ranks] == [3] * WORLD


# -- a tiny run ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_run_trains_domain_local_with_per_domain_weights(tiny_corpus, tiny_cache, tiny_tokenizer, tmp_path):
    with open(tiny_corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    corpus = tiny_corpus.parent / "corpus_domains.csv"  # beside the images its paths name
    names = ["breast", "derm", "derm", "xray"]  # row i: names[i % 4]
    with open(corpus, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "domain"])
        w.writeheader()
        w.writerows({**r, "domain": names[i % 4]} for i, r in enumerate(rows))
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        train__max_steps=2,
        train__checkpoint_every=0,
        loss__terms="[{kind: infonce}, {kind: affinity, weight: 3, kwargs: {scope: domain}}]",
        loss__combine="{mode: confidence, scope: domain, positives: caption}",
        loss__routing="{column: domain, teachers: {breast: [oc], derm: [hf], xray: [oc, hf]}, weights: {breast: 4}}",
    )
    run = build_run(cfg, make_accelerator(cfg))
    batch = next(iter(run.loader))
    ids = {"breast": 0, "derm": 1, "xray": 2}  # sorted names
    assert batch.domains.tolist() == [ids[names[r % 4]] for r in batch.rows.tolist()]
    assert batch.row_weights.tolist() == [4.0 if r % 4 == 0 else 1.0 for r in batch.rows.tolist()]
    assert batch.caption_ids is not None  # loss.combine.positives: caption
    assert np.isfinite(train(cfg)["losses"]["loss"])

    plain = tiny_config(
        tiny_corpus,
        tmp_path / "plain",
        tiny_cache,
        tokenizer=tiny_tokenizer,
        loss__terms="[{kind: infonce}, {kind: affinity, kwargs: {scope: domain}}]",
    )
    with pytest.raises(DataError, match=r"scope: domain .* needs each row's domain: data\.domain_column='domain'"):
        build_run(plain, make_accelerator(plain))
