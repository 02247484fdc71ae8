"""Training data: the dataset of usable corpus rows, the collate that reads their cached features, typed batches.

The join of corpus rows to cache rows (by key) and loss routing live in `distill.data.cache_join`; the epoch order in
`distill.data.samplers`.

Why per-sample generators: a sample's crop (or stored view) is drawn from a generator seeded by (seed, epoch,
index), not from the global RNG, so a resumed run, a run with more workers or a run over more processes shows
the student exactly the same pixels as an uninterrupted single-process one.
Why the cache is read in the collate function: one batched HDF5 read per batch, inside the worker, from a reader
each worker opens for itself (h5py handles must not cross a fork).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from cache.build.image_rows import needed_side
from cache.build.views import (
    RATIO,  # the aspect range of the cache's stored views, for the student's own crops
    ViewDist,
)
from cache.sources.corpus import BadSampleError
from cache.sources.image_decode import DecodeLimits, decode_image, jpeg_size
from cache.sources.stream import ShardUnreadable
from cache.store.reader import FeatureReader
from cache.store.verify import BadRowsError, bad_row_mask, format_rows, row_problem
from distill.data.device_decode import EncodedImages, decode_into
from distill.data.inputs import BatchRows, InputValue, Producer, move_inputs, produce
from teachers.kernel.modality import Pair
from teachers.transforms import PreprocessCfg, apply_view, to_rgb

if TYPE_CHECKING:
    from cache.store.reader import Embeddings

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The corpus and the cache cannot be used together as configured; the message says how to fix it."""


SKIP_HINT = ", or set data.bad_features=skip to train those rows without that teacher"


@overload
def _move(t: torch.Tensor, device, non_blocking: bool) -> torch.Tensor: ...
@overload
def _move(t: torch.Tensor | None, device, non_blocking: bool) -> torch.Tensor | None: ...
def _move(t: torch.Tensor | None, device, non_blocking: bool) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=non_blocking)


@dataclass
class TrainBatch:
    """One micro-batch: student inputs plus the cached features of the same rows."""

    images: torch.Tensor  # (B, 3, H, W) uint8 pixels; the model normalises them on its device (DistillModel)
    tokens: torch.Tensor  # (B, L) student token ids
    rows: torch.Tensor  # (B,) corpus rows
    views: torch.Tensor  # (B,) stored view index shown, -1 for the student's own crop
    teacher_feats: dict[str, Pair[torch.Tensor]] = field(default_factory=dict)  # teacher -> (B, Dt) image, text
    route: torch.Tensor | None = None  # (B, T) bool, T in the loss's teacher order (loss.routing); None: all
    caption_ids: torch.Tensor | None = None  # (B,) int64 caption_id of each caption: equal iff captions are equal
    skipped_features: int = 0  # (teacher, row) pairs dropped for bad cached features (data.bad_features=skip)
    encoded: EncodedImages | None = None  # data.decode=device: images still to decode into `images` (on device)
    teacher_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # teacher -> (B, G*G, Dt) patch tokens
    domains: torch.Tensor | None = None  # (B,) int64 domain id (data.domain_column) when a loss term has scope: domain
    row_weights: torch.Tensor | None = None  # (B,) float32 teacher-term weight per row (loss.routing.weights)
    inputs: dict[str, InputValue] = field(default_factory=dict)  # named inputs of loss terms (distill.data.inputs)

    def to(self, device, non_blocking: bool = False) -> TrainBatch:
        """Accelerate's send_to_device calls this."""
        mv = functools.partial(_move, device=device, non_blocking=non_blocking)
        return TrainBatch(
            mv(self.images),
            mv(self.tokens),
            mv(self.rows),
            mv(self.views),
            {t: p.map(mv) for t, p in self.teacher_feats.items()},
            mv(self.route),
            mv(self.caption_ids),
            self.skipped_features,
            self.encoded,
            {t: mv(x) for t, x in self.teacher_tokens.items()},
            domains=mv(self.domains),
            row_weights=mv(self.row_weights),
            inputs=move_inputs(self.inputs, device, non_blocking),
        )

    def decoded(self, interpolation: str) -> TrainBatch:
        """This batch with its still-encoded JPEGs decoded into `images` on their device
        (`distill.data.device_decode`)."""
        if not self.encoded:
            return self
        try:
            decode_into(self.images, self.encoded, interpolation, self.rows.tolist())
        except ValueError as e:
            raise DataError(str(e)) from e
        return dataclasses.replace(self, encoded=None)

    def route_by_teacher(self, teachers: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """{teacher: (B,) bool} from the route mask (columns in `teachers`' order), as TeacherBatch.route takes."""
        if self.route is None:
            return None
        if self.route.shape[1] != len(teachers):
            raise ValueError(
                f"the batch's route mask has {self.route.shape[1]} teacher columns; got {len(teachers)} teacher names"
            )
        return {t: self.route[:, j] for j, t in enumerate(teachers)}

    def __len__(self) -> int:
        return self.images.shape[0]


def caption_id(caption: str) -> int:
    """A stable 63-bit id of the exact caption string (BLAKE2b, unlike the salted `hash()`: equal in every process
    and run), so identical captions can be found across the global batch (`positives: caption` loss terms)."""
    digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator owned by one sample of one epoch (independent of workers, processes and resumption)."""
    s = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)


def random_crop_params(
    gen: torch.Generator, width: int, height: int, scale: Sequence[float], flip: bool
) -> list[float]:
    """A RandomResizedCrop box (torchvision's algorithm, our generator) as relative (x0, y0, w, h, flip)."""
    area = width * height
    u = torch.rand(4 * 10 + 1, generator=gen, dtype=torch.float64).tolist()
    box = None
    for i in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[4 * i])
        log_r = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[4 * i + 1]
        w = int(round(math.sqrt(target * math.exp(log_r))))
        h = int(round(math.sqrt(target / math.exp(log_r))))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(u[4 * i + 2] * (width - w + 1))
            y0 = int(u[4 * i + 3] * (height - h + 1))
            box = (x0, y0, w, h)
            break
    if box is None:  # fallback: the whole image (scale upper bound is 1 here)
        box = (0, 0, width, height)
    x0, y0, w, h = box
    do_flip = 1.0 if flip and u[-1] < 0.5 else 0.0
    return [x0 / width, y0 / height, w / width, h / height, do_flip]


def make_uint8_view_transform(cfg: PreprocessCfg) -> Callable[[Image.Image, Sequence[float]], torch.Tensor]:
    """`teachers.transforms.make_view_transform` without its last step: (3, H, W) uint8, not normalised floats.

    Why: uint8 is a quarter of float32's bytes through the worker queue, pinned memory and the host-to-device copy,
    and normalising on the device (`student_pixels`) gives the same floats: PIL's resize already rounds to uint8.
    """
    interp, size = InterpolationMode(cfg.interpolation), list(cfg.image_size)

    def transform(img: Image.Image, params: Sequence[float]) -> torch.Tensor:
        return TF.pil_to_tensor(TF.resize(apply_view(to_rgb(img), params), size, interpolation=interp))

    return transform


def trim_padding(tokens: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(B, L) token ids cut to the batch's longest caption; `pad_id` None (a tower that needs L): unchanged.

    Why: an HF text tower masks attention by `ids != pad_id` and pools the CLS token, so the columns where every
    caption is padding change nothing but the cost (a 256 context for ~40-token captions)."""
    if pad_id is None or tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    used = (tokens != pad_id).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def _decoded(img: Image.Image | None) -> Image.Image:
    """The image decoded in the worker; None only where the JPEG is left to the device (`data.decode: device`)."""
    if img is None:
        raise TypeError("no decoded image: this row's JPEG is decoded on the device")
    return img


class PairDataset(Dataset):
    """Usable corpus rows, each with the cache row of the same key; items are (epoch, index) or plain indices.

    Images are decoded under `max_pixels` (over it: a DataError naming the row, before decoding) and JPEGs at least
    twice the side the student's crops need are decoded at a reduced scale (`cache.sources.image_decode.DecodeLimits`):
    this changes the pixels of such large JPEGs only.
    """

    def __init__(
        self,
        corpus,
        preprocess: PreprocessCfg,
        *,
        crop_scale=(0.9, 1.0),
        flip: bool = False,
        seed: int = 0,
        cache_rows: np.ndarray | None = None,
        corpus_rows: np.ndarray | None = None,
        view_params: np.ndarray | None = None,
        max_pixels: int = 64_000_000,
        view_dist=None,
        decode: str = "worker",
    ):
        # the smallest crop the student sees: of the stored views (`view_dist`, the cache's ViewDist), else its own
        crop = (view_dist or ViewDist(1)).min_crop() if view_params is not None else (crop_scale[0], RATIO[0])
        self.corpus = corpus.with_limits(
            DecodeLimits(
                max_pixels or None, hint="data.max_pixels", draft_side=needed_side(preprocess.image_size, *crop)
            )
        )
        self.preprocess = preprocess
        self.crop_scale, self.flip, self.seed = tuple(crop_scale), flip, seed
        self.corpus_rows = np.arange(len(corpus)) if corpus_rows is None else np.asarray(corpus_rows)
        self.cache_rows = self.corpus_rows if cache_rows is None else np.asarray(cache_rows)
        self.view_params = view_params  # (N_cache, K, 5 or 8) or None: stored views to show
        self.transform = make_uint8_view_transform(preprocess)  # normalised on the device (DistillModel)
        if decode not in ("worker", "device"):
            raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}")
        # device: JPEGs travel compressed, decoded by the main process (distill.data.device_decode)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.corpus_rows)

    def choose(self, item) -> tuple[int, torch.Generator]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        return int(i), sample_generator(self.seed, int(epoch), int(i))

    def __getitem__(self, item) -> dict:
        i, gen = self.choose(item)
        row, cache_row = int(self.corpus_rows[i]), int(self.cache_rows[i])

        try:
            raw, size = self._encoded(row) if self.decode == "device" else (None, None)
            img: Image.Image | None = (
                None
                if size
                else self.corpus.load_image(row)
                if raw is None
                else decode_image(raw, None, self.corpus.keys[row], self.corpus.describe(row), self.corpus.limits)
            )
        except BadSampleError as e:
            if isinstance(e, ShardUnreadable):  # the transport, not the sample: retried already
                raise DataError(
                    f"{e}; when it is readable again, rerun the same command (training resumes from "
                    "the last checkpoint)"
                ) from e
            raise DataError(
                f"{e}; build a feature cache (`distill cache`) to find and skip bad samples, or fix or remove that row"
            ) from e
        if self.view_params is not None:
            k = int(torch.randint(self.view_params.shape[1], (1,), generator=gen))
            params = self.view_params[cache_row, k].tolist()
        else:
            k = -1
            w, h = size or _decoded(img).size
            params = random_crop_params(gen, w, h, self.crop_scale, self.flip)
        item = {"caption": self.corpus.captions[row], "row": row, "cache_row": cache_row, "view": k}
        if size:  # decoded, cropped and resized on the training device (TrainBatch.decoded)
            if raw is None:  # `_encoded` gives a size only with the bytes
                raise TypeError(f"row {row}: a JPEG size without its bytes")
            return {
                **item,
                "encoded": torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                "params": params,
                "size": tuple(self.preprocess.image_size),
            }
        return {**item, "image": self.transform(_decoded(img), params)}

    def _encoded(self, row: int) -> tuple[bytes | None, tuple[int, int] | None]:
        """A JPEG's bytes and (width, height), to decode on the device; (_, None): decode it here."""
        raw = self.corpus.load_bytes(row)
        if raw is None:
            return None, None
        return raw, jpeg_size(raw, self.corpus.keys[row], self.corpus.describe(row), self.corpus.limits)


class Collate:
    """Stacks items, tokenises captions, reads the rows' teacher features (same stored view) from the cache.

    `pad_id` set (an HF text tower): the tokens are cut to the batch's longest caption (`trim_padding`).
    Each caption's `caption_id` goes into the batch (with `caption_ids`), so the loss can tell which rows share a
    caption.

    `block_rows` > 0 (block-shuffled sampler): the reader reads whole blocks of that many rows and keeps
    `cache_blocks` of them per teacher, which should cover the sampler's shuffle buffer.

    Every teacher row read is checked (finite, unit norm, checksum; `cache.store.verify`), so a damaged cache never
    trains silently. `bad_features="stop"` raises `BadRowsError` naming teacher, modality and cache rows;
    "skip" keeps the sample (InfoNCE still sees it) but drops that teacher for that row: its features become
    zeros (0 * NaN would still be NaN in the loss) and its route entry is cleared, which gives it weight 0 in
    every teacher term (`distill.losses.combine.weight_matrix`). Zeroed rows still appear as (all-zero) columns
    of other rows' teacher similarity matrices in batch-level terms (affinity, ICL): a small bias, not a NaN.
    """

    def __init__(
        self,
        tokenizer,
        features: str | None = None,
        teachers: Sequence[str] = (),
        use_views: bool = False,
        block_rows: int = 0,
        cache_blocks: int = 16,
        route: np.ndarray | None = None,
        caption_ids: bool = True,
        bad_features: str = "stop",
        pad_id: int | None = None,
        token_teachers: Sequence[str] = (),
        domains: np.ndarray | None = None,
        row_weights: np.ndarray | None = None,
        inputs: dict[str, Producer] | None = None,
    ):
        # by CORPUS row, like `route`: (N_corpus,) int64 domain ids (`distill.data.domains.domain_ids`) for scope:
        # domain terms, and (N_corpus,) float teacher-term weights (loss.routing.weights); None: not in the batch
        self.domains, self.row_weights = domains, row_weights
        self.inputs = dict(inputs or {})  # name -> producer of a loss term's batch input (distill.data.inputs)
        self.pad_id = pad_id  # trim captions to the batch's longest (`trim_padding`); None: the full context
        self.token_teachers = list(token_teachers)  # those of `teachers` whose patch tokens a spatial term reads
        self.tokenizer, self.features, self.teachers, self.use_views = tokenizer, features, list(teachers), use_views
        self.block_rows, self.cache_blocks = int(block_rows), int(cache_blocks)
        self.route = route  # (N_corpus, T) bool by CORPUS row, T = `teachers` (route_mask); None: no routing
        self.caption_ids = caption_ids  # hash the captions (only `positives: caption` terms read the ids)
        if bad_features not in ("stop", "skip"):
            raise ValueError(f"bad_features must be 'stop' or 'skip', got {bad_features!r}")
        self.bad_features = bad_features
        self.skipped_total = 0  # (teacher, row) pairs skipped by this process (or worker) so far
        self._reader = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"] = None  # each worker opens its own reader
        return d

    @property
    def reader(self):
        if self._reader is None:
            self._reader = FeatureReader(
                self.features,
                teachers=self.teachers,
                block_rows=self.block_rows,
                cache_blocks=self.cache_blocks,
                unreadable="nan" if self.bad_features == "skip" else "raise",
            )
        return self._reader

    def _read_checked(
        self, rows: np.ndarray, views: np.ndarray | None
    ) -> tuple[dict[str, Embeddings], dict[str, np.ndarray], np.ndarray]:
        """The rows' teacher features, the `token_teachers`' patch tokens (of the same views), and a (B, T) bool
        mask of the (row, teacher) pairs that are bad (non-finite tokens count)."""
        features = self.features
        if features is None:
            raise ValueError("no feature cache to read teacher features from")
        try:
            got = self.reader.read(rows, self.teachers, views=views)
            toks = self.reader.read_tokens(rows, self.token_teachers, views=views) if self.token_teachers else {}
        except BadRowsError as e:  # a checksum failure (stop mode): same message as a NaN row, with the option
            raise BadRowsError.of(e.path, e.teacher, e.modality, e.rows, e.problem, SKIP_HINT) from None
        bad = np.zeros((len(rows), len(self.teachers)), dtype=bool)
        for j, t in enumerate(self.teachers):
            for m, x in got[t].items():  # (Modality, array)
                mask = bad_row_mask(x)
                if mask.any() and self.bad_features == "stop":
                    first = int(np.flatnonzero(mask)[0])
                    raise BadRowsError.of(features, t, m, rows[mask], row_problem(x[first]), SKIP_HINT)
                bad[:, j] |= mask
        for t, x in toks.items():
            if x.ndim != 3:
                raise ValueError(
                    f"teacher {t!r} patch tokens have shape {x.shape[1:]} per row; a spatial term needs "
                    f"the view the student saw (data.use_views=true)"
                )
            mask = ~np.isfinite(x.reshape(len(x), -1)).all(1)
            if mask.any() and self.bad_features == "stop":
                raise BadRowsError.of(features, t, "patch-token", rows[mask], "non-finite", SKIP_HINT)
            bad[:, self.teachers.index(t)] |= mask
        return got, toks, bad

    def __call__(self, items: list[dict]) -> TrainBatch:
        views = torch.tensor([it["view"] for it in items], dtype=torch.long)
        feats: dict[str, Pair[torch.Tensor]] = {}
        tokens: dict[str, torch.Tensor] = {}
        corpus_rows = [it["row"] for it in items]
        route = None if self.route is None else torch.from_numpy(self.route[corpus_rows])
        skipped = 0
        if self.features and self.teachers:
            rows = np.array([it["cache_row"] for it in items])
            got, toks, bad = self._read_checked(rows, views.numpy() if self.use_views else None)
            if bad.any():  # skip mode: drop the teacher for those rows, never let a NaN reach the loss
                if route is None:
                    route = torch.ones(len(items), len(self.teachers), dtype=torch.bool)
                route = route & ~torch.from_numpy(bad)
                for j, t in enumerate(self.teachers):
                    for _, x in got[t].items():
                        x[bad[:, j]] = 0.0
                    if t in toks:
                        toks[t][bad[:, j]] = 0.0
                skipped = int(bad.sum())
                self.skipped_total += skipped
                log.warning(
                    "data.bad_features=skip: dropped %s for cache rows with bad features (%d pair(s) so "
                    "far in this process); run `distill info --verify %s`",
                    ", ".join(
                        f"teacher {t!r} on rows {format_rows(rows[bad[:, j]])}"
                        for j, t in enumerate(self.teachers)
                        if bad[:, j].any()
                    ),
                    self.skipped_total,
                    self.features,
                )
            feats = teacher_feats(got)
            tokens = {t: torch.from_numpy(x) for t, x in toks.items()}
        captions = [it["caption"] for it in items]
        extra = (
            produce(
                self.inputs,
                BatchRows(
                    np.asarray(corpus_rows, dtype=np.int64),
                    np.asarray([it.get("cache_row", it["row"]) for it in items], dtype=np.int64),
                    views.numpy(),
                    captions,
                ),
            )
            if self.inputs
            else {}
        )
        enc = [j for j, it in enumerate(items) if "encoded" in it]
        return TrainBatch(
            images=torch.stack(
                [torch.zeros(3, *it["size"], dtype=torch.uint8) if "encoded" in it else it["image"] for it in items]
            ),
            tokens=trim_padding(self.tokenizer(captions), self.pad_id),
            rows=torch.tensor(corpus_rows, dtype=torch.long),
            views=views,
            teacher_feats=feats,
            route=route,
            caption_ids=torch.tensor([caption_id(c) for c in captions], dtype=torch.int64)
            if self.caption_ids
            else None,
            skipped_features=skipped,
            teacher_tokens=tokens,
            domains=None
            if self.domains is None
            else torch.from_numpy(np.asarray(self.domains[corpus_rows], dtype=np.int64)),
            row_weights=None
            if self.row_weights is None
            else torch.from_numpy(np.asarray(self.row_weights[corpus_rows], dtype=np.float32)),
            encoded=EncodedImages([items[j]["encoded"] for j in enc], [items[j]["params"] for j in enc], enc)
            if enc
            else None,
            inputs=extra,
        )


def mean_view(x: torch.Tensor) -> torch.Tensor:
    """(B, K, D) view embeddings when the student does not use stored views: their normalised mean."""
    return torch.nn.functional.normalize(x.mean(1), dim=-1) if x.ndim == 3 else x


def teacher_feats(got: dict[str, Embeddings]) -> dict[str, Pair[torch.Tensor]]:
    """The reader's embeddings as `TrainBatch.teacher_feats`: float32 tensors, stored views averaged.

    Every tensor is a contiguous view into ONE buffer. Why: a DataLoader worker sends each tensor storage as its own
    shared-memory block, which the main process receives with a socket round trip: with 9 teachers, 6 to 11 ms per
    batch for two blocks per teacher against 4 to 5 ms for one (a 200 ms CPU step; benchmarks/README.md).
    """

    def as_rows(x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x))
        return mean_view(x.to(torch.float32)) if x.ndim == 3 else x

    rows = {t: e.map(as_rows) for t, e in got.items()}
    buf = torch.empty(sum(x.numel() for p in rows.values() for _, x in p.items()), dtype=torch.float32)
    at = 0

    def place(x: torch.Tensor) -> torch.Tensor:
        nonlocal at
        view = buf[at : at + x.numel()].view(x.shape)
        view.copy_(x)  # to float32 here, in the same pass
        at += x.numel()
        return view

    return {t: p.map(place) for t, p in rows.items()}
