"""Everything a training run needs, built from a `Config`: data, student, heads, loss, and the derived `RunPlan`.

Why apart from train.py: the loop stays short and readable, and each builder here is testable on its own. Values
derived at run time (teachers found in the cache, accumulation per epoch, total steps) live in `RunPlan`; the
Config is never modified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from cache.build.views import RATIO, read_view_dist
from cache.sources.corpus import Corpus
from cache.store.reader import FeatureReader
from distill.config.train_config import Config, ConfigError, DataCfg, LossCfg, StudentCfg, TrainCfg
from distill.data.cache_join import CacheJoin, join_cache
from distill.data.domains import Domains, build_balance, load_domains
from distill.data.inputs import InputSetup, build_inputs
from distill.data.loader import Collate, DataError, PairDataset, TrainBatch
from distill.data.samplers import Dealing, DomainBalance, EpochSampler, reader_blocks
from distill.data.stream_data import open_train_corpus, stream_sampler
from distill.losses import SIGLIP_INIT, DistillLoss, LossTermCfg, TeacherBatch, teacher_logit_bias
from distill.training.heads import ProjectionHeads, TokenAdaptors
from distill.training.optim import accum_for_epoch, global_batch_for_epoch, steps_per_epoch, total_steps
from distill.training.routing import build_routing, loss_domains
from distill.training.student_model import DistillModel
from student.build import build_student
from student.freeze import apply_freezing
from student.presets import PRESETS
from student.run_files import STUDENT_CONFIG_DIR
from student.tokenizer import train_wordpiece
from teachers.tokens import TokensUnsupported, visual_token_shape
from teachers.transforms import PreprocessCfg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """Derived values: how many processes, rows, steps, which teachers with which weights and dims."""

    train: TrainCfg
    per_device_batch: int
    num_processes: int
    num_rows: int
    total_steps: int
    teachers: dict[str, float] = field(default_factory=dict)  # name -> weight
    teacher_attrs: dict[str, dict] = field(default_factory=dict)  # name -> cache attrs (spec, embed_dim, ...)
    routing: dict | None = None  # loss.routing with rows_per_teacher and unrouted_rows (None: no routing)
    stored_views: bool = False  # the student saw the cache's stored views (hybrid/distill, or replayed: contrastive)
    augmentation: str = ""  # one line: which views or crops the student saw (`augmentation_summary`)

    def global_batch(self, epoch: int) -> int:
        return global_batch_for_epoch(self.train, self.per_device_batch, self.num_processes, epoch)

    def accum(self, epoch: int) -> int:
        return accum_for_epoch(self.train, self.per_device_batch, self.num_processes, epoch)


@dataclass
class Run:
    """What the training loop needs, built once from a Config (each piece by the helper that owns it)."""

    plan: RunPlan  # sizes, steps, teachers and their cache attributes, routing summary
    model: DistillModel
    loss: DistillLoss
    loader: DataLoader
    student_dir: Path  # RUN/student-config (written by the main process)
    corpus: Corpus  # for run_meta.json's size and fingerprint
    join: CacheJoin | None  # corpus rows <-> cache rows (None: contrastive mode)
    terms: list[LossTermCfg]
    # other processes build their student in a scratch folder, kept (and deleted) with the Run
    scratch: tempfile.TemporaryDirectory | None = None
    domains: Domains | None = None  # data.domain_column's domain of each corpus row (rows_per_domain in the log)


def resolve_terms(terms: Sequence[LossTermCfg], teacher_weights: dict[str, float]) -> list[LossTermCfg]:
    """The terms with their log names set and teacher terms' teachers defaulting to `teacher_weights`."""
    return [
        t.model_copy(
            update={"name": t.label, "teachers": (t.teachers or dict(teacher_weights)) if t.uses_teachers else None}
        )
        for t in terms
    ]


def named_teachers(loss: LossCfg) -> list[str] | None:
    """Teachers the loss names (loss.teachers and per-term teachers), or None: use every cached teacher."""
    names = list(loss.teachers or {})
    for t in loss.terms:
        names += [n for n in (t.teachers or {}) if n not in names]
    return names or None


def build_tokenizer_dir(student: StudentCfg, corpus, output_dir: Path, accelerator) -> str | None:
    """The tokenizer folder: the configured one, the preset's own (None), or WordPiece trained on the corpus."""
    if student.tokenizer_dir or student.preset not in PRESETS:
        return student.tokenizer_dir
    if PRESETS.get(student.preset).tokenizer_hub_id:
        return None
    out = output_dir / "tokenizer"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (out / "tokenizer.json").is_file():
            log.info(
                "training a %d-token WordPiece vocabulary on %d captions -> %s", student.vocab_size, len(corpus), out
            )
            train_wordpiece(corpus.captions, out, vocab_size=student.vocab_size)
    return str(out)


def build_student_model(s: StudentCfg, student_dir: Path, tokenizer_dir: str | None, logit_bias: bool = False):
    """logit_bias: the loss reads the student's logit bias, so the student gets one, with SigLIP's initial scale
    and bias (`SIGLIP_INIT`) unless student.overrides sets them (a SPEC's own weights replace both)."""
    overrides = {**SIGLIP_INIT, **s.overrides} if logit_bias else s.overrides
    bundle = build_student(s.preset, student_dir, tokenizer_dir=tokenizer_dir, image_size=s.image_size, **overrides)
    apply_freezing(
        bundle.model,
        image_blocks=s.freeze_vision_blocks,
        text_layers=s.lock_text_layers,
        patch_dropout=s.patch_dropout or None,
        grad_checkpointing=s.grad_checkpointing,
    )
    return bundle


def build_run(cfg: Config, accelerator) -> Run:
    output_dir = Path(cfg.train.output_dir)
    corpus = open_train_corpus(cfg.data, accelerator)  # streamed shards: listed once, read in stream order
    join: CacheJoin | None = None
    replay = replays_views(cfg)  # the same-views baseline: the cache's rows and stored views, no features read
    if cfg.mode != "contrastive" or replay:
        if cfg.data.features is None:  # Config refuses it (a teacher mode needs data.features); replay implies it
            raise ConfigError(f"mode={cfg.mode} needs data.features")
        join = join_cache(corpus, cfg.data.features, named_teachers(cfg.loss), use_views=cfg.data.use_views)
    if replay and join is not None and join.view_params is None:
        raise DataError(
            f"mode=contrastive with data.features={cfg.data.features} and data.use_views=true trains on "
            f"the cache's stored views, but that cache stores none (built without --views K); set "
            f"data.use_views=false or remove data.features to train on the student's own crops"
        )
    view_dist = read_view_dist(cfg.data.features) if join is not None and join.view_params is not None else None
    cfg.data.check_views(view_dist)  # data.flip / data.crop_scale set against the stored views: refused
    cached: dict[str, dict] = join.teachers if join is not None else {}  # teacher -> attrs; no cache: none
    teachers = dict(cfg.loss.teachers) if cfg.loss.teachers else {t: 1.0 for t in cached}
    terms = resolve_terms(cfg.terms, teachers)
    used = sorted({t for term in terms for t in (term.teachers or {})}, key=list(cached).index)

    tokenizer_dir = build_tokenizer_dir(cfg.student, corpus, output_dir, accelerator)
    tmp = None
    student_dir = output_dir / STUDENT_CONFIG_DIR
    if not accelerator.is_main_process:  # only the main process writes RUN/student-config
        tmp = tempfile.TemporaryDirectory(prefix="student-")
        student_dir = Path(tmp.name)
    stats = _teacher_stats(cfg.data.features, used) if cfg.loss.combine.balance == "phi_s" else None
    loss = DistillLoss(terms, teacher_names=used, combine=cfg.loss.combine, teacher_stats=stats)
    biased = loss.uses_logit_bias({t: teacher_logit_bias(cached[t]) for t in used})
    set_seed(cfg.train.seed)  # identical initialisation on every process and on resume
    bundle = build_student_model(cfg.student, student_dir, tokenizer_dir, logit_bias=biased)
    reads = loss.head_modalities()  # heads only where a term reads them (affinity needs none)
    heads = (
        ProjectionHeads(bundle.embed_dim, {t: int(cached[t]["embed_dim"]) for t in used if t in reads})
        if reads
        else None
    )
    pp = PreprocessCfg.from_open_clip(bundle.preprocess_cfg)
    adaptors = build_adaptors(cfg, loss, join, bundle.model)  # a spatial term: per-teacher patch-token adaptors
    model = DistillModel(
        bundle.model,
        heads,
        pixel_mean=pp.mean,
        pixel_std=pp.std,  # normalises uint8 pixels
        adaptors=adaptors,
    )
    frozen = model.freeze_unreached(loss.uses_logit_scale, reads, loss.student_modalities(), uses_logit_bias=biased)
    if frozen:
        log.info("frozen because no loss term reaches them: %s", ", ".join(frozen))

    run_routing = build_routing(
        cfg.loss.routing, corpus, join, used, cfg.data.features, accelerator, output_dir, cfg.train.seed
    )  # a route mask by a column, or auto: clusters of the cache (computed once, saved in the run folder)
    routing = run_routing.routing if run_routing is not None else None
    views = join.view_params if join is not None else None
    ds = PairDataset(
        corpus,
        pp,
        crop_scale=cfg.data.crop_scale,
        flip=cfg.data.flip,
        seed=cfg.train.seed,
        corpus_rows=join.corpus_rows if join else None,
        cache_rows=join.cache_rows if join else None,
        view_params=views,
        view_dist=view_dist,
        max_pixels=cfg.data.max_pixels,
        decode=cfg.data.decode,
    )
    plan = RunPlan(
        train=cfg.train,
        per_device_batch=cfg.data.batch_size,
        num_processes=accelerator.num_processes,
        num_rows=len(ds),
        total_steps=0,
        teachers={t: teachers.get(t, 1.0) for t in used},
        teacher_attrs={t: cached[t] for t in used},
        routing=None if run_routing is None else run_routing.record(),
        stored_views=views is not None,
        augmentation=augmentation_summary(cfg.data, view_dist),
    )
    log.info("augmentation: %s", plan.augmentation)
    plan = dataclasses.replace(plan, total_steps=_total_steps(cfg.train, plan))
    domains = load_domains(cfg.data, corpus, streamed=getattr(corpus, "streamed", False))
    if getattr(corpus, "streamed", False):  # whole shards per (rank, worker), a bounded shuffle buffer
        sampler: EpochSampler = stream_sampler(
            cfg.data, corpus, ds.corpus_rows, plan.global_batch, seed=cfg.train.seed, ranks=accelerator.num_processes
        )
    else:
        # replayed views: the order a hybrid run over this cache draws (block_shuffle at auto), so same batches
        sampler = build_sampler(
            cfg.data,
            join if used or replay else None,
            len(ds),
            plan.global_batch,
            seed=cfg.train.seed,
            ranks=accelerator.num_processes,
            balance=build_balance(cfg.data, domains, ds.corpus_rows),
        )
    blocks = sampler.block_ids is not None and bool(used)
    read_rows, held = reader_blocks(
        cfg.data.block_rows, cfg.data.shuffle_buffer_blocks, join.chunk_rows if join else 0, sampler.dealing is not None
    )
    collate = Collate(
        bundle.tokenizer,
        cfg.data.features if used else None,
        used,
        use_views=views is not None,
        block_rows=read_rows if blocks else 0,
        cache_blocks=held,
        route=None if routing is None else routing.mask,
        caption_ids=loss.uses_caption_ids,
        bad_features=cfg.data.bad_features,
        pad_id=text_pad_id(bundle.model) if cfg.data.trim_captions else None,
        token_teachers=loss.token_teachers(),
        domains=loss_domains(cfg.data, loss.uses_domains, corpus, domains, run_routing),
        row_weights=None if routing is None else routing.row_weights,
        inputs=build_inputs(loss.batch_inputs(), InputSetup(cfg, corpus, join, tuple(used))),
    )
    # persistent workers keep their Collate (and its open cache reader) across epochs; the sampler, which
    # set_epoch reshuffles, lives in the main process. Pinned batches let the copy to the GPU run non-blocking.
    workers = cfg.data.num_workers
    loader = DataLoader(
        ds,
        batch_size=cfg.data.batch_size,
        drop_last=True,
        collate_fn=collate,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
    )
    return Run(plan, model, loss, loader, output_dir / STUDENT_CONFIG_DIR, corpus, join, terms, tmp, domains)


def replays_views(cfg: Config) -> bool:
    """mode=contrastive with data.features and data.use_views: the same-views baseline. It trains on the cache's
    rows and stored views (the same view per (row, epoch, seed) and, at the same data.sampler, the same batches as
    a hybrid run over that cache with the same seed) and reads no teacher feature; why: student minus baseline
    then measures distillation, not a difference in augmentation."""
    return cfg.mode == "contrastive" and cfg.data.features is not None and cfg.data.use_views


def augmentation_summary(data: DataCfg, view_dist) -> str:
    """One line for run_meta.json and reports: the stored views the student saw (`view_dist`, the cache's
    `cache.build.views.ViewDist`) or, with None, its own crops."""
    if view_dist is not None:
        return f"stored views of {data.features}: {view_dist.describe()}"
    lo, hi = data.crop_scale
    return (
        f"own crops: scale {lo:g}-{hi:g}, ratio {RATIO[0]:.6g}-{RATIO[1]:.6g}, "
        f"{'flip p 0.5' if data.flip else 'no flips'}, no colour jitter"
    )


def build_adaptors(cfg: Config, loss: DistillLoss, join: CacheJoin | None, student) -> TokenAdaptors | None:
    """Per-teacher patch-token adaptors for the loss's spatial terms (None without one), after the checks that
    make their targets meaningful: tokens in the cache, the view the student sees, every student patch kept."""
    names = loss.token_teachers()
    if not names:
        return None
    if cfg.student.patch_dropout > 0:
        raise ConfigError(
            f"a spatial loss term matches every patch token, but student.patch_dropout="
            f"{cfg.student.patch_dropout} drops some; set student.patch_dropout=0"
        )
    try:
        h, w, dim = visual_token_shape(student.visual)
    except TokensUnsupported as e:
        raise ConfigError(f"a spatial loss term needs the student's patch tokens: {e}") from None
    if join is None:  # a spatial term reads teacher tokens: it comes with a teacher mode and its cache
        raise ConfigError("a spatial loss term needs the teachers' patch tokens from data.features")
    grids = {}
    for t in names:
        attrs = join.teachers[t]
        grid = int(attrs.get("tokens", 0))
        if not grid:
            raise DataError(
                f"{cfg.data.features}: teacher {t!r} has no patch tokens for the spatial loss term; "
                f"cache it with `distill cache --tokens G` (into a new file or under another name)"
            )
        if grid > min(h, w):
            raise ConfigError(
                f"teacher {t!r} tokens are cached on a {grid} x {grid} grid, finer than the student's "
                f"{h} x {w} patch grid; cache them with --tokens {min(h, w)} or less"
            )
        if int(attrs.get("views", 0)) and join.view_params is None:
            raise ConfigError(
                f"teacher {t!r} patch tokens are cached per view: a spatial loss term needs "
                f"data.use_views=true so the student sees the view they belong to"
            )
        grids[t] = (grid, int(attrs["token_dim"]))
    if join.view_params is None:
        log.warning(
            "spatial loss term without stored views: the teachers' tokens come from their eval transform "
            "and the student sees its own crop, so the token grids only roughly cover the same pixels; "
            "cache with --views K for exact alignment"
        )
    return TokenAdaptors(dim, grids)


def text_pad_id(model) -> int | None:
    """The pad id of an HF text tower (it masks attention by `ids != pad_id`), so batches can be cut to their
    longest caption; None for other towers (open_clip's own text transformer pools by position: full context)."""
    from open_clip.hf_model import HFTextEncoder  # noqa: PLC0415 (lazy: heavy open_clip, ~4 s)

    text = getattr(model, "text", None)
    pad = getattr(text.config, "pad_token_id", None) if isinstance(text, HFTextEncoder) else None
    return None if pad is None else int(pad)


def teacher_batch(
    batch: TrainBatch, scales: dict[str, float], teacher_names: Sequence[str], biases: dict[str, float] | None = None
) -> TeacherBatch | None:
    """The loss's TeacherBatch for a TrainBatch: cached features, logit scales (and sigmoid teachers' logit biases),
    the route mask by teacher, and the rows' domain ids and teacher-term weights when the loss reads them."""
    if not batch.teacher_feats:
        return None
    return TeacherBatch(
        batch.teacher_feats,
        scales,
        route=batch.route_by_teacher(teacher_names),
        logit_bias=dict(biases or {}),
        tokens=batch.teacher_tokens,
        domains=batch.domains,
        row_weights=batch.row_weights,
    )


def resolve_threads(
    threads: int | None, num_local_processes: int | None = None, env: Mapping | None = None, cores: int | None = None
) -> tuple[int, str]:
    """(torch intra-op threads per process, why): train.threads, else OMP_NUM_THREADS, else usable cores //
    processes on this node (LOCAL_WORLD_SIZE), at least 1."""
    env = os.environ if env is None else env
    if threads is not None:
        return int(threads), "train.threads"
    omp = str(env.get("OMP_NUM_THREADS", "")).strip()
    if omp:
        try:
            if int(omp) > 0:
                return int(omp), "OMP_NUM_THREADS"
        except ValueError:
            pass
        log.warning("ignoring OMP_NUM_THREADS=%r (not a positive integer)", omp)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_local_processes is None:
        try:
            num_local_processes = int(env.get("LOCAL_WORLD_SIZE") or 1)
        except ValueError:
            num_local_processes = 1
    procs = max(1, num_local_processes)
    return max(1, cores // procs), f"{cores} usable cores // {procs} local processes"


def sampler_kind(data: DataCfg, reads_features: bool) -> str:
    """data.sampler with `auto` resolved: block_shuffle when a cache is joined (teacher features read, or stored
    views replayed by mode=contrastive), else random."""
    if data.sampler != "auto":
        return data.sampler
    return "block_shuffle" if reads_features else "random"


def build_sampler(
    data: DataCfg,
    join: CacheJoin | None,
    num_rows: int,
    global_batch_of,
    *,
    seed: int,
    ranks: int = 1,
    balance: DomainBalance | None = None,
) -> EpochSampler:
    """The epoch order (distill.data.samplers.EpochSampler). `join`: the cache join when features are read, else None.

    Block-shuffled blocks are blocks of cache rows (the reader's blocks); without a cache, of dataset items.
    block_deal: the same blocks dealt to (rank, worker) pairs for `ranks` processes (distill.data.samplers.deal_order).
    `balance` (data.domain_balance < 1, `distill.data.domains.build_balance`): every kind draws its items by domain.
    """
    kind = sampler_kind(data, join is not None)
    if kind == "random":
        return EpochSampler(num_rows, seed, global_batch_of, balance=balance)
    b = data.block_rows
    if join is not None:
        c = join.chunk_rows
        if b % c and b < int(join.cache_rows.max(initial=0)) + 1:
            raise ConfigError(
                f"data.block_rows={b} is not a multiple of the cache's HDF5 chunk of {c} rows "
                f"({data.features}): each block would read partial chunks twice; use "
                f"data.block_rows={max(c, round(b / c) * c)}"
            )
        rows = join.cache_rows
    else:
        rows = np.arange(num_rows)
    dealing = Dealing(ranks, max(1, data.num_workers), data.batch_size) if kind == "block_deal" else None
    return EpochSampler(
        num_rows,
        seed,
        global_batch_of,
        block_ids=rows // b,
        buffer_blocks=data.shuffle_buffer_blocks,
        dealing=dealing,
        balance=balance,
    )


def _total_steps(train: TrainCfg, plan: RunPlan) -> int:
    first = plan.global_batch(0)
    plan.accum(0)  # raises when the schedule does not divide
    if steps_per_epoch(plan.num_rows, first) == 0:
        raise ConfigError(
            f"{plan.num_rows} usable rows are fewer than one global batch of {first} "
            f"(data.batch_size x processes x accumulation); lower data.batch_size or train.grad_accum"
        )
    if train.max_steps is None:
        for e in range(train.epochs):
            plan.accum(e)  # raises when the schedule does not divide
    return total_steps(train, plan.num_rows, plan.per_device_batch, plan.num_processes)


def _teacher_stats(features: str | None, teachers: list[str]) -> dict:
    if features is None:  # Config refuses it: phi_s balances teacher terms, which read data.features
        raise ConfigError("loss.combine.balance=phi_s needs data.features")
    with FeatureReader(features) as reader:
        return {t: reader.stats(t) for t in teachers}
