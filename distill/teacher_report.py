"""`distill teachers FEATURES.h5`: what each cached teacher knows about each slice of the corpus, from the cache alone.

No model is run: every number comes from the teachers' stored image and text embeddings.

Slices: the values of a corpus column (`by_column`, the corpus joined to the cache by key as training joins it,
`distill.data.cache_join.join_cache`), or k-means clusters (`by_clusters`, numpy, seeded) of the teachers'
embeddings: by default every teacher's L2-normalised image and text embeddings side by side (`on="joint"`; or
image or text only, or one teacher's), each cluster named by its three commonest caption words (stop words left
out) when the corpus is given, else `cluster-I`. Training's label-free routing (`loss.routing.auto`,
`distill.training.routing`) uses the same clusters and scores.

Per slice and teacher (`score`):
- accuracy: image-to-text top-1 retrieval within the slice. The slice's rows are shuffled (seeded) and cut into
  pools of `pool` rows; each row's image is ranked against the pool's captions by the teacher's cosine similarity,
  and it scores when its own caption comes first, or a copy of it does (a row whose text every teacher embeds
  identically: templated captions such as "a chest x-ray showing pneumonia"). The last pool of a slice may be
  smaller (at least 2 rows; a single leftover row is not scored). `chance` is the mean of 1 / pool size over the
  scored rows (the floor for distinct captions; where captions repeat, a guess scores more: see skill).
- skill: accuracy minus the hits the teacher's own choices would score at random (per pool, the sum over captions
  of the rows choosing it times the rows holding it, over the pool's size). It is what ranks teachers (`best`,
  `--suggest`, `loss.routing.auto`): on a slice of one template per class, a teacher that picks one template for
  every image has accuracy (that template's share) but no skill.
- agreement: the fraction of scored rows where this teacher's top-1 caption (or a copy) is another teacher's,
  averaged over the other teachers (1.0 with a single teacher).
- rows: the slice's size (usable rows: done by every teacher and not marked bad).

Features are read by blocks of contiguous rows (`block_rows`, one hyperslab per teacher and modality), not row by
row: each block's rows join their slice's carry-over (fewer than `pool` rows left from earlier blocks), which is
shuffled and cut into pools. So a pool is drawn from the slice's rows in one block plus the carry-over, not from
the whole slice at once. Teachers cached with views are scored on view 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.sources.corpus import Corpus, open_corpus
from cache.store.reader import FeatureReader
from distill.data.cache_join import join_cache

DEFAULT_POOL = 64
DEFAULT_BLOCK_ROWS = 65536
CLUSTER_BLOCK_ROWS = 16384  # clustering holds one teacher's block as float32 at a time (32 MB at 512 dims)
STOP_WORDS = frozenset(
    "a an the of in on at to for from by with without and or not no is are was were be been this that these those "
    "it its as into than then there here which who whom whose what when where how image images photo picture "
    "showing shows shown show view seen left right".split()
)
_WORD = re.compile(r"[a-z][a-z0-9-]+")


@dataclass(frozen=True)
class Slices:
    """Which slice each scored cache row is in: `rows` (sorted cache row ids) and `ids` (their slice index)."""

    names: list[str]
    rows: np.ndarray
    ids: np.ndarray
    how: str  # "column NAME" or "clusters K (teacher T, seed S)"
    column: str | None = None  # the corpus column (None for clusters)


@dataclass
class SliceScore:
    name: str
    rows: int
    scored: int = 0
    chance: float = 0.0
    accuracy: dict[str, float] = field(default_factory=dict)
    skill: dict[str, float] = field(default_factory=dict)  # accuracy minus what its choices hit by chance
    agreement: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> str:
        """The teacher with the highest skill (the first of equals)."""
        return max(self.skill, key=lambda t: self.skill[t]) if self.skill else ""


@dataclass(frozen=True)
class Report:
    path: str
    teachers: list[str]
    slices: list[SliceScore]
    how: str
    pool: int
    seed: int
    column: str | None = None

    def to_dict(self) -> dict:
        return {
            "features": self.path,
            "slices_by": self.how,
            "column": self.column,
            "pool": self.pool,
            "seed": self.seed,
            "teachers": list(self.teachers),
            "accuracy": "image-to-text top-1 within random pools of the slice (a copy of the own caption counts)",
            "skill": "accuracy minus the hits its choices would score if they ignored the image",
            "agreement": "fraction of rows whose top-1 caption equals another teacher's, mean over the others",
            "slices": [
                {
                    "slice": s.name,
                    "rows": s.rows,
                    "scored_rows": s.scored,
                    "chance": s.chance,
                    "accuracy": s.accuracy,
                    "skill": s.skill,
                    "agreement": s.agreement,
                    "best": s.best,
                }
                for s in self.slices
            ],
        }


def _open(path: str | Path) -> FeatureReader:
    if not Path(path).is_file():
        raise FileNotFoundError(f"feature cache {path} not found; build it with `distill cache`")
    return FeatureReader(str(path))


def _corpus(data: str | Path) -> Corpus:
    """The corpus named by --data (joined to the cache by key with training's `join_cache`)."""
    if not Path(data).exists():
        raise FileNotFoundError(f"corpus {data} not found: check --data")
    return open_corpus(str(data))


def by_column(features: str | Path, data: str | Path, column: str) -> Slices:
    """Slices by the values of corpus column `column`, the corpus joined to the cache by key."""
    corpus = _corpus(data)
    cells = corpus.column(column)  # CorpusError (one line) naming the columns there are
    join = join_cache(corpus, features, None, use_views=False)
    order = np.argsort(join.cache_rows, kind="stable")
    rows, corpus_rows = join.cache_rows[order], join.corpus_rows[order]
    values = [cells[i] for i in corpus_rows.tolist()]
    names = sorted(set(values))
    index = {v: j for j, v in enumerate(names)}
    ids = np.array([index[v] for v in values], dtype=np.int64)
    return Slices(names, rows, ids, f"column {column}", column)


def normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def read_view0(reader: FeatureReader, teacher: str, rows: np.ndarray):
    """`teacher`'s stored pair (image, text) of sorted cache `rows`; a teacher cached with views gives view 0."""
    views = np.zeros(len(rows), dtype=np.int64) if int(reader.teacher_attrs(teacher).get("views", 0) or 0) else None
    return reader.read(rows, [teacher], views=views)[teacher]


def row_blocks(rows: np.ndarray, block_rows: int) -> list[np.ndarray]:
    """`rows` (sorted) cut where they cross a multiple of block_rows: each piece lies in one block of the file."""
    if not len(rows):
        return []
    ids = rows // block_rows
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    return np.split(rows, cuts)


CLUSTER_ON = ("joint", "image", "text")
PROJECT_DIM = 256  # wider concatenations are projected (seeded Gaussian) to this many dims before k-means


def cluster_vectors(
    reader: FeatureReader, rows: np.ndarray, teachers: Sequence[str], on: str, seed: int, block_rows: int = 0
) -> np.ndarray:
    """(len(rows), d) float32 unit vectors that k-means clusters: each teacher's L2-normalised image and/or text
    embeddings (`on`: joint, image, text) concatenated and normalised, read by blocks. A concatenation wider than
    PROJECT_DIM is multiplied by a seeded Gaussian matrix (random projection keeps cosines within a few hundredths),
    so 1M rows x 9 teachers fit in about 1 GB."""
    if on not in CLUSTER_ON:
        raise ValueError(f"cluster on {on!r} is unknown; use one of {', '.join(CLUSTER_ON)}")
    mods = {"joint": ("image", "text"), "image": ("image",), "text": ("text",)}[on]
    wide = sum(int(reader.teacher_attrs(t)["embed_dim"]) for t in teachers) * len(mods)
    proj = None
    if wide > PROJECT_DIM:
        proj = np.random.default_rng(seed).standard_normal((wide, PROJECT_DIM)).astype(np.float32)
    out = []
    for block in row_blocks(rows, block_rows or CLUSTER_BLOCK_ROWS):
        parts: list[np.ndarray] = []
        x = np.zeros((len(block), PROJECT_DIM), np.float32)
        at = 0
        for t in teachers:
            pair = read_view0(reader, t, block)
            for m in mods:
                part = normalise(getattr(pair, m))
                if proj is None:
                    parts.append(part)
                else:  # the concatenation times proj, one part at a time: the wide block is never held
                    x += part @ proj[at : at + part.shape[1]]
                at += part.shape[1]
        out.append(normalise(np.concatenate(parts, axis=1) if proj is None else x))
    return np.concatenate(out) if out else np.zeros((0, PROJECT_DIM if proj is not None else wide), np.float32)


def kmeans_ids(x: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """Spherical k-means (k-means++ start, seeded) of unit rows `x`: each row's cluster id (int64)."""
    rng = np.random.default_rng(seed)
    centres = [x[int(rng.integers(len(x)))]]
    dist = np.full(len(x), np.inf, dtype=np.float64)
    for _ in range(1, k):  # k-means++
        dist = np.minimum(dist, ((x - centres[-1]) ** 2).sum(1))
        total = dist.sum()
        pick = int(rng.choice(len(x), p=dist / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[pick])
    c = np.stack(centres)

    def nearest() -> np.ndarray:
        return np.concatenate([np.argmax(x[i : i + 65536] @ c.T, axis=1) for i in range(0, len(x), 65536)])

    assign = np.full(len(x), -1, dtype=np.int64)
    for _ in range(iters):
        new = nearest()
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = normalise(members.mean(0))
    return nearest().astype(np.int64)


def kmeans(
    features: str | Path,
    k: int,
    seed: int,
    teacher: str | None = None,
    rows: np.ndarray | None = None,
    on: str = "joint",
    teachers: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(rows, their cluster ids, what was clustered) over `rows` (default: the cache's usable rows, sorted): the
    embeddings of `teacher` alone, else of `teachers` (default: every teacher in the cache), `on` joint/image/text."""
    with _open(features) as reader:
        names = reader.teacher_names
        if not names:
            raise ValueError(f"{features} holds no teachers yet; add some with `distill cache`")
        if teacher is not None and teacher not in names:
            raise ValueError(f"cluster teacher {teacher!r} is not in {features} (it has {', '.join(names)})")
        chosen = [teacher] if teacher is not None else list(teachers or names)
        rows = reader.usable_rows() if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
        if k < 1 or k > len(rows):
            raise ValueError(f"--clusters {k} must be between 1 and the {len(rows)} rows to cluster")
        x = cluster_vectors(reader, rows, chosen, on, seed)
    return rows, kmeans_ids(x, k, seed), f"{on} embeddings of {', '.join(chosen)}"


def by_clusters(
    features: str | Path,
    k: int,
    seed: int,
    data: str | Path | None = None,
    teacher: str | None = None,
    on: str = "joint",
) -> Slices:
    """Slices by k-means clusters of the teachers' embeddings (`kmeans`), named by caption words."""
    captions: dict[int, str] = {}
    if data is not None:
        corpus = _corpus(data)
        join = join_cache(corpus, features, None, use_views=False)
        captions = {int(r): corpus.captions[int(i)] for r, i in zip(join.cache_rows, join.corpus_rows)}
    rows, ids, what = kmeans(features, k, seed, teacher, on=on)
    if captions:
        keep = np.isin(rows, np.fromiter(captions, dtype=np.int64))
        rows, ids = rows[keep], ids[keep]
    names = cluster_names([[captions.get(int(r), "") for r in rows[ids == j]] for j in range(k)])
    return Slices(names, rows, ids, f"clusters {k} ({what}, seed {seed})")


def cluster_names(captions: Sequence[Sequence[str]]) -> list[str]:
    """Each cluster's name from its captions' three commonest words (`cluster-J` without words), kept distinct."""
    names = [_cluster_name(j, c) for j, c in enumerate(captions)]
    for j, n in enumerate(names):  # two clusters with the same words: keep both apart
        if names.count(n) > 1:
            names[j] = f"{n} ({j})"
    return names


def within_margin(slice_score: SliceScore, teachers: Sequence[str], margin: float) -> list[str]:
    """The teachers whose skill on the slice is within `margin` of its best (in `teachers` order)."""
    if not slice_score.skill:
        return []
    top = max(slice_score.skill.values())
    return [t for t in teachers if slice_score.skill.get(t, -np.inf) >= top - margin]


def _cluster_name(j: int, captions: Sequence[str]) -> str:
    words: Counter[str] = Counter()
    for text in captions:
        words.update(w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS)
    top = [w for w, _ in words.most_common(3)]
    return " ".join(top) if top else f"cluster-{j}"


@dataclass
class _Tally:
    correct: np.ndarray  # (S, T)
    expected: np.ndarray  # (S, T) hits of the same choices matched to the pool's captions at random
    agree: np.ndarray  # (S, T, T)
    scored: np.ndarray  # (S,)
    inv_pool: np.ndarray  # (S,) sum of 1 / pool size over scored rows


def _score_pool(tally: _Tally, s: int, emb: dict[str, tuple[np.ndarray, np.ndarray]], teachers: list[str]) -> None:
    n = len(next(iter(emb.values()))[0])
    if n < 2:
        return
    # a caption's identity in the pool: rows whose text every teacher embeds identically hold the same caption
    # (templated captions), so retrieving a copy of one's own caption is a hit, and two teachers agree on it
    first: dict[bytes, int] = {}
    rows = [b"".join(emb[t][1][i].tobytes() for t in teachers) for i in range(n)]
    caption = np.array([first.setdefault(r, len(first)) for r in rows], dtype=np.int64)  # exact, no sort
    top = np.stack([caption[np.argmax(emb[t][0] @ emb[t][1].T, axis=1)] for t in teachers])  # (T, n)
    tally.correct[s] += (top == caption[None, :]).sum(1)
    # chance of those choices: sum over captions c of (rows choosing c) x (rows whose caption is c) / n, i.e. each
    # row's chosen caption's count in the pool. A teacher that picks the same template for every image scores that
    # template's share, and no skill.
    own = np.bincount(caption, minlength=n)
    tally.expected[s] += own[top].sum(1) / n
    tally.agree[s] += (top[:, None, :] == top[None, :, :]).sum(2)
    tally.scored[s] += n
    tally.inv_pool[s] += 1.0


def score(
    features: str | Path,
    slices: Slices,
    pool: int = DEFAULT_POOL,
    seed: int = 0,
    block_rows: int = 0,
    teachers: Sequence[str] | None = None,
) -> Report:
    """Per slice and teacher (default: every teacher in the cache): retrieval accuracy in pools of `pool`,
    agreement, size (see the module docstring)."""
    if pool < 2:
        raise ValueError(f"--pool must be at least 2, got {pool}")
    block_rows = block_rows or DEFAULT_BLOCK_ROWS
    rng = np.random.default_rng(seed)
    with _open(features) as reader:
        teachers = list(teachers or reader.teacher_names)
        n_s, n_t = len(slices.names), len(teachers)
        tally = _Tally(
            np.zeros((n_s, n_t)), np.zeros((n_s, n_t)), np.zeros((n_s, n_t, n_t)), np.zeros(n_s), np.zeros(n_s)
        )
        carry: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        order = np.argsort(slices.rows, kind="stable")
        rows_sorted, ids_sorted = slices.rows[order], slices.ids[order]
        for block in row_blocks(rows_sorted, block_rows):
            lo = np.searchsorted(rows_sorted, block[0])
            ids = ids_sorted[lo : lo + len(block)]
            got = {}
            for t in teachers:
                pair = read_view0(reader, t, block)
                got[t] = (normalise(pair.image), normalise(pair.text))
            for s in np.unique(ids).tolist():
                here = ids == s
                emb = {t: (got[t][0][here], got[t][1][here]) for t in teachers}
                if s in carry:
                    emb = {
                        t: (np.concatenate([carry[s][t][0], e[0]]), np.concatenate([carry[s][t][1], e[1]]))
                        for t, e in emb.items()
                    }
                n = len(emb[teachers[0]][0])
                perm = rng.permutation(n)
                full = (n // pool) * pool
                for i in range(0, full, pool):
                    take = perm[i : i + pool]
                    _score_pool(tally, s, {t: (e[0][take], e[1][take]) for t, e in emb.items()}, teachers)
                rest = perm[full:]
                carry[s] = {t: (e[0][rest], e[1][rest]) for t, e in emb.items()}
        for s, emb in carry.items():  # each slice's last, smaller pool
            _score_pool(tally, s, emb, teachers)
    sizes = np.bincount(slices.ids, minlength=n_s)
    out = []
    for s, name in enumerate(slices.names):
        scored = float(tally.scored[s])
        score_s = SliceScore(name, int(sizes[s]), int(scored))
        if scored:
            score_s.chance = float(tally.inv_pool[s] / scored)
            for j, t in enumerate(teachers):
                score_s.accuracy[t] = float(tally.correct[s, j] / scored)
                score_s.skill[t] = float((tally.correct[s, j] - tally.expected[s, j]) / scored)
                others = [tally.agree[s, j, u] / scored for u in range(n_t) if u != j]
                score_s.agreement[t] = float(np.mean(others)) if others else 1.0
        out.append(score_s)
    return Report(str(features), teachers, out, slices.how, pool, seed, slices.column)
