"""`distill audit`: exact and near duplicates inside a corpus, and corpus rows that copy an eval task's images.

Why: scraped biomedical corpora repeat images (a figure reused, a case posted twice, a benchmark's test images
printed in a paper); a student that "beats" a teacher on test images it trained on proves nothing.

Two stages, in order:
1. Exact: each corpus row's encoded image bytes (`Corpus.load_bytes`; the decoded pixels where a reader gives no
   bytes) hashed with BLAKE2b; rows with equal hashes are one group. Task images given as files are hashed the
   same way, so a byte-identical copy of a test image is found without any model.
2. Near: cosine of one cached teacher's L2-normalised image embeddings (view 0 for a cache with views). The
   corpus rows (one per exact group) are compared block by block (`block_rows` x `block_rows` products; the
   N x N matrix is never held), keeping each row's `top_k` nearest at cosine >= min(threshold, 0.90) (fewer
   candidates to merge: the merge then costs little beside the products); pairs at or above `threshold` are joined
   into groups (union-find). Task images are embedded with the same teacher, loaded from the SPEC the cache
   recorded, through eval's own loaders (`load_task`, `load_splits`, `encode_images`); every corpus row keeps its
   closest task image, so every corpus row that matches some task image is found (not only the top k of each).

Rows to drop: every row of a group but its first (lowest corpus row), and every row that matches a task image.
The embeddings are read from the cache by contiguous blocks and held once (float32, float16 past
`HALF_ELEMENTS`), so memory is about N x D x 4 bytes plus one block product.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cache.sources.corpus import Corpus, open_corpus
from cache.store.reader import FeatureReader
from distill.config.audit_job import AuditJob
from distill.data.cache_join import join_cache
from distill.eval.datasets import SplitData, image_paths
from distill.teacher_report import DEFAULT_BLOCK_ROWS, normalise, read_view0, row_blocks

HALF_ELEMENTS = 1 << 28  # above this many embedding values (1 GB as float32), hold them as float16
SENSITIVITY = (0.90, 0.95, 0.98, 0.99)  # thresholds at which the report counts rows with a near neighbour


@dataclass(frozen=True)
class Pair:
    """Two matching images: corpus row `row` and `other` (a corpus row, or an image index of task split `scope`)."""

    kind: str  # "exact" (same bytes) or "near" (embedding cosine >= threshold)
    scope: str  # "corpus", or the task split's label "TASK (role)"
    row: int
    other: int
    cosine: float
    text_cosine: float | None = None  # the two captions' cosine (corpus pairs only)


@dataclass(frozen=True)
class Drop:
    row: int
    key: str
    reason: str  # "exact copy of KEY", "near copy of KEY", "matches TASK (role) image I"
    cosine: float


@dataclass
class TaskCheck:
    name: str  # "TASK (role)"
    task: str  # the task's name (what `distill eval` looks up, `audit_out.audit_status`)
    images: int
    matched_images: int = 0  # task images that some corpus row copies
    rows: int = 0  # corpus rows that copy one of them


@dataclass
class Audit:
    features: str
    data: str
    fingerprint: str
    teacher: str
    spec: str
    threshold: float
    rows: int  # corpus rows audited (joined to the cache and usable)
    corpus_rows: int  # rows of the corpus
    exact_groups: int = 0
    near_groups: int = 0
    tasks: list[TaskCheck] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    nearest: dict[float, int] = field(default_factory=dict)  # threshold -> rows whose nearest other row is >= it

    @property
    def leaked_rows(self) -> int:
        return sum(t.rows for t in self.tasks)

    def verdict(self) -> str:
        """The result in words: leaks first (they invalidate an evaluation), then duplicates inside the corpus."""
        dup = sum(1 for d in self.drops if not d.reason.startswith("matches"))
        inside = (
            f"{self.exact_groups} exact and {self.near_groups} near-duplicate groups inside the corpus "
            f"({dup} rows to drop)"
        )
        leaks = [t for t in self.tasks if t.rows]
        if leaks:
            named = "; ".join(
                f"{t.name}: {t.matched_images} of {t.images} images copied by {t.rows} rows" for t in leaks
            )
            return f"LEAK at cosine >= {self.threshold}: {named}. Drop them (drop.csv, --write-clean); {inside}"
        checked = f"none of the {sum(t.images for t in self.tasks)} images of {len(self.tasks)} task splits"
        head = f"no leak: {checked} is copied in the corpus" if self.tasks else "no task checked (give --task)"
        return f"{head} (cosine >= {self.threshold}); {inside}"

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "data": self.data,
            "corpus_fingerprint": self.fingerprint,
            "teacher": self.teacher,
            "spec": self.spec,
            "threshold": self.threshold,
            "rows_audited": self.rows,
            "corpus_rows": self.corpus_rows,
            "exact_groups": self.exact_groups,
            "near_groups": self.near_groups,
            "rows_to_drop": len(self.drops),
            "tasks": [vars(t) for t in self.tasks],
            "rows_with_a_near_neighbour": {f"{t:.2f}": n for t, n in self.nearest.items()},
            "verdict": self.verdict(),
        }


# -- stage 1: exact copies -------------------------------------------------------------------------------
def image_hash(data: bytes | None, image=None) -> str:
    """BLAKE2b of the encoded bytes ("bytes:..."), else of the decoded pixels with size and mode ("pixels:...")."""
    if data is not None:
        return "bytes:" + hashlib.blake2b(data, digest_size=16).hexdigest()
    head = f"{image.mode}{image.size}".encode()
    return "pixels:" + hashlib.blake2b(head + image.tobytes(), digest_size=16).hexdigest()


def corpus_hashes(corpus: Corpus, rows: np.ndarray) -> list[str]:
    out = []
    for i in tqdm(rows.tolist(), desc="hashing corpus images", unit="img", leave=False):
        data = corpus.load_bytes(int(i))
        out.append(image_hash(data, None if data is not None else corpus.load_image(int(i))))
    return out


def split_hashes(data: SplitData) -> list[str]:
    """A task split's image hashes: file bytes for images given as paths, else decoded pixels."""
    paths = image_paths(data.images)
    if paths is not None:
        return [image_hash(Path(p).read_bytes()) for p in paths]
    return [image_hash(None, data.image(i)) for i in range(len(data))]


# -- stage 2: embeddings, block by block -------------------------------------------------------------------
def read_images(reader: FeatureReader, teacher: str, cache_rows: np.ndarray, block_rows: int) -> np.ndarray:
    """(len(cache_rows), D) unit image embeddings of `teacher`, in the order of `cache_rows`, read by blocks."""
    dim = int(reader.teacher_attrs(teacher)["embed_dim"])
    dtype = np.float16 if len(cache_rows) * dim > HALF_ELEMENTS else np.float32
    order = np.argsort(cache_rows, kind="stable")
    out = np.empty((len(cache_rows), dim), dtype)
    at = 0
    for block in tqdm(row_blocks(cache_rows[order], block_rows), desc=f"reading {teacher}", unit="block", leave=False):
        out[order[at : at + len(block)]] = normalise(read_view0(reader, teacher, block).image)
        at += len(block)
    return out


def _merge(best_s: np.ndarray, best_i: np.ndarray, r: np.ndarray, c: np.ndarray, s: np.ndarray) -> None:
    """Fold candidate neighbours (row r, column c, cosine s) into each row's top k, in place: per touched row, its
    k kept and its new candidates sorted by cosine (descending), the first k kept."""
    if not len(r):
        return
    k = best_s.shape[1]
    touched = np.unique(r)
    rows = np.concatenate([np.repeat(touched, k), r])
    cols = np.concatenate([best_i[touched].ravel(), c])
    sims = np.concatenate([best_s[touched].ravel(), s])
    order = np.lexsort((-sims, rows))
    rows, cols, sims = rows[order], cols[order], sims[order]
    first = np.searchsorted(rows, touched)
    rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.append(first, len(rows))))
    keep = rank < k  # every touched row has at least its k kept entries, so all k slots are refilled
    best_s[rows[keep], rank[keep]] = sims[keep]
    best_i[rows[keep], rank[keep]] = cols[keep]


def nearest_within(x: np.ndarray, k: int, block_rows: int, floor: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows of `x` (unit rows) at cosine >= `floor`: (cosines (N, k) descending,
    indices (N, k); -inf and -1 where fewer). Blocks (i, j >= i) are multiplied once and fold into both sides;
    only pairs at or above `floor` are merged, which keeps the merge far cheaper than the products."""
    n = len(x)
    best_s = np.full((n, k), -np.inf, np.float32)
    best_i = np.full((n, k), -1, np.int64)
    starts = list(range(0, n, block_rows))
    bar = tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="near duplicates", unit="block", leave=False)
    for ia, a in enumerate(starts):
        qa = x[a : a + block_rows].astype(np.float32)
        for b in starts[ia:]:
            qb = qa if b == a else x[b : b + block_rows].astype(np.float32)
            sims = qa @ qb.T
            if b == a:
                np.fill_diagonal(sims, np.nan)  # never >= floor: a row is not its own neighbour
            r, c = np.nonzero(sims >= floor)
            s = sims[r, c]
            _merge(best_s, best_i, r + a, c + b, s)
            if b != a:
                _merge(best_s, best_i, c + b, r + a, s)
            bar.update()
    bar.close()
    return best_s, best_i


def closest_in(x: np.ndarray, q: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `x`, its closest row of `q` (both unit rows): (cosine (N,), index (N,)), by blocks."""
    best_s = np.full(len(x), -np.inf, np.float32)
    best_i = np.full(len(x), -1, np.int64)
    for a in range(0, len(x), block_rows):
        xa = x[a : a + block_rows].astype(np.float32)
        for b in range(0, len(q), block_rows):
            sims = xa @ q[b : b + block_rows].astype(np.float32).T
            j = np.argmax(sims, axis=1)
            s = sims[np.arange(len(xa)), j]
            better = s > best_s[a : a + len(xa)]
            best_s[a : a + len(xa)][better] = s[better]
            best_i[a : a + len(xa)][better] = j[better] + b
    return best_s, best_i


def _groups(n: int, links: Sequence[tuple[int, int]]) -> np.ndarray:
    """Union-find: each of n items' group id (the smallest member)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j in links:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(n)])


# -- the audit ----------------------------------------------------------------------------------------------
def _task_splits(job: AuditJob) -> list[tuple[str, SplitData]]:
    """Every split each task evaluates on, labelled "TASK (role)" (eval's own loaders)."""
    from distill.eval.datasets import load_splits  # noqa: PLC0415 (lazy: only with --task)
    from distill.eval.tasks import load_task  # noqa: PLC0415 (lazy: only with --task)

    out = []
    for name in job.tasks:
        task = load_task(name, job.max_samples)
        out += [(f"{task.name} ({role})", data) for role, data in load_splits(task).items()]
    return out


def embed_splits(spec: str, splits: Sequence[tuple[str, SplitData]], job: AuditJob, dim: int) -> list[np.ndarray]:
    """Each split's unit image embeddings by the teacher the cache recorded (`spec`), as eval embeds them."""
    from distill.eval.embeddings import encode_images  # noqa: PLC0415 (lazy: torch only to embed task images)
    from distill.eval.runner import resolve_device  # noqa: PLC0415 (lazy: torch only to embed task images)
    from teachers.registry import load_teacher  # noqa: PLC0415 (lazy: torch only to embed task images)

    if not splits:
        return []
    try:
        model = load_teacher(spec, device=resolve_device(job.device))
    except ValueError as e:
        raise ValueError(
            f"{job.features}: cannot load the SPEC {spec!r} the cache recorded for teacher {job.teacher!r}, "
            f"to embed the task images: {e}"
        ) from None
    if model.embed_dim != dim:
        raise ValueError(f"SPEC {spec!r} embeds in {model.embed_dim} dims but the cache holds {dim}; check --teacher")
    return [encode_images(model, data, job.batch_size, desc=label).numpy() for label, data in splits]


def run_audit(job: AuditJob) -> tuple[Audit, Corpus, dict[str, SplitData]]:
    """The audit (`Audit`), the corpus and the task splits by label (for the contact sheet)."""
    if not Path(job.data).exists():
        raise FileNotFoundError(f"corpus {job.data} not found: check --data")
    corpus = open_corpus(job.data)
    splits = _task_splits(job)  # a bad task name or file: before the long work
    with FeatureReader(job.features) as reader:
        names = reader.teacher_names
        if not names:
            raise ValueError(f"{job.features} holds no teachers yet; add one with `distill cache`")
        teacher = job.teacher or names[0]
        if teacher not in names:
            raise ValueError(f"--teacher {teacher!r} is not in {job.features} (it has {', '.join(names)})")
        job = job.model_copy(update={"teacher": teacher})
        attrs = reader.teacher_attrs(teacher)
        join = join_cache(corpus, job.features, [teacher], use_views=False)
        rows, cache_rows = join.corpus_rows, join.cache_rows
        x = read_images(reader, teacher, cache_rows, DEFAULT_BLOCK_ROWS)
        spec, dim = str(attrs.get("spec", "")), int(attrs["embed_dim"])
        audit = Audit(
            job.features, job.data, corpus.fingerprint(), teacher, spec, job.threshold, len(rows), len(corpus)
        )
        keys = corpus.keys
        hashes = corpus_hashes(corpus, rows)
        first: dict[str, int] = {}
        for at, h in enumerate(hashes):  # stage 1: byte-identical rows
            j = first.setdefault(h, at)
            if j != at:
                audit.pairs.append(Pair("exact", "corpus", int(rows[at]), int(rows[j]), 1.0))
                audit.drops.append(Drop(int(rows[at]), keys[rows[at]], f"exact copy of {keys[rows[j]]}", 1.0))
        audit.exact_groups = len({first[h] for at, h in enumerate(hashes) if first[h] != at})
        reps = np.array(sorted(first.values()), dtype=np.int64)  # one row per exact group, in corpus order
        x_reps = x if len(reps) == len(x) else x[reps]  # no copy of the embeddings without exact duplicates
        _near(audit, x_reps, rows[reps], cache_rows[reps], reader, teacher, job, keys)
    for (label, data), q in zip(splits, embed_splits(spec, splits, job, dim)):
        _leaks(audit, label, data, q, x, rows, hashes, job, keys)
    audit.drops.sort(key=lambda d: d.row)
    return audit, corpus, dict(splits)


def _near(
    audit: Audit,
    x: np.ndarray,
    rows: np.ndarray,
    cache_rows: np.ndarray,
    reader: FeatureReader,
    teacher: str,
    job: AuditJob,
    keys: Sequence[str],
) -> None:
    """Stage 2 inside the corpus: near-duplicate pairs and groups among the exact groups' first rows."""
    if len(x) < 2:
        audit.nearest = dict.fromkeys(SENSITIVITY, 0)
        return
    floor = min(job.threshold, *SENSITIVITY)  # neighbours below every threshold reported are never needed
    best_s, best_i = nearest_within(x, min(job.top_k, len(x) - 1), job.block_rows, floor)
    audit.nearest = {t: int((best_s[:, 0] >= t).sum()) for t in SENSITIVITY}
    hit = np.argwhere((best_s >= job.threshold) & (best_i >= 0))
    links = sorted({(min(i, int(best_i[i, c])), max(i, int(best_i[i, c]))) for i, c in hit.tolist()})
    if not links:
        return
    involved = np.unique(np.array(links).ravel())
    text = normalise(reader.read(np.sort(cache_rows[involved]), [teacher])[teacher].text)
    where = {int(r): t for r, t in zip(np.sort(cache_rows[involved]).tolist(), text)}
    cos = {(i, j): float(x[i].astype(np.float32) @ x[j].astype(np.float32)) for i, j in links}
    for i, j in links:
        tc = float(where[int(cache_rows[i])] @ where[int(cache_rows[j])])
        audit.pairs.append(Pair("near", "corpus", int(rows[i]), int(rows[j]), cos[i, j], tc))
    group = _groups(len(x), links)
    members: dict[int, list[int]] = {}
    for i in np.unique(np.array(links).ravel()).tolist():
        members.setdefault(int(group[i]), []).append(i)
    audit.near_groups = len(members)
    best: dict[int, float] = {}  # each row's highest cosine to another member (what the drop reports)
    for (i, j), c in cos.items():
        best[i], best[j] = max(best.get(i, c), c), max(best.get(j, c), c)
    for head, items in members.items():
        for i in items:
            if i != head:
                audit.drops.append(Drop(int(rows[i]), keys[rows[i]], f"near copy of {keys[rows[head]]}", best[i]))


def _leaks(
    audit: Audit,
    label: str,
    data: SplitData,
    q: np.ndarray,
    x: np.ndarray,
    rows: np.ndarray,
    hashes: list[str],
    job: AuditJob,
    keys: Sequence[str],
) -> None:
    """Corpus rows that copy an image of one task split: same bytes, or closest task image at >= threshold."""
    check = TaskCheck(label, label.rsplit(" (", 1)[0], len(data))
    task_hash = {h: i for i, h in enumerate(split_hashes(data))}
    best_s, best_i = closest_in(x, normalise(q), job.block_rows)
    matched: set[int] = set()
    dropped = {d.row: n for n, d in enumerate(audit.drops)}
    for at in range(len(rows)):
        exact = task_hash.get(hashes[at])
        if exact is None and best_s[at] < job.threshold:
            continue
        image, cosine = (exact, 1.0) if exact is not None else (int(best_i[at]), float(best_s[at]))
        matched.add(image)
        audit.pairs.append(Pair("exact" if exact is not None else "near", label, int(rows[at]), image, cosine))
        drop = Drop(int(rows[at]), keys[rows[at]], f"matches {label} image {image}", cosine)
        if int(rows[at]) in dropped:  # a leak outranks a duplicate: the reason says the worse of the two
            audit.drops[dropped[int(rows[at])]] = drop
        else:
            audit.drops.append(drop)
            dropped[int(rows[at])] = len(audit.drops) - 1
    check.matched_images, check.rows = len(matched), sum(1 for p in audit.pairs if p.scope == label)
    audit.tasks.append(check)
