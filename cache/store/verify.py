"""Integrity of stored teacher features: `distill info --verify`, and the row checks the writer and reader share.

Three things can make a stored row wrong, and each is caught here:
- the bytes changed on disk after they were written (bit rot, a bad copy): HDF5's fletcher32 checksum, on the
  feature datasets of every file written since format 1 + checksums, makes h5py raise OSError for that chunk;
- a teacher returned NaN/inf or a zero vector (refused by `distill cache` since, but older files may hold them);
- a value that is finite but far from a unit vector (corruption in a file without checksums).
Patch tokens (`distill cache --tokens`) are not unit vectors: they get the checksum and finiteness checks.
Reads go in blocks; a block that raises is narrowed to its HDF5 chunks, so the report names the exact rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NoReturn

import h5py
import numpy as np
from tqdm.auto import tqdm

import cache.store.layout as L
from cache.store.schema import CacheError, check_root
from cache.store.verify_stats import StatsCheck, summed_rows
from teachers.kernel.modality import MODALITIES

NORM_TOL = 0.02  # |norm - 1| allowed: teachers L2-normalise, float16 storage moves the norm by < 1e-3
TOKEN_BLOCK_BYTES = 256 * 1024 * 1024  # patch tokens are read in blocks of about this many float32 bytes


def bad_row_mask(x: np.ndarray, tol: float = NORM_TOL) -> np.ndarray:
    """(B,) True where a row of (B, D) or (B, K, D) embeddings is non-finite or not unit-norm (any view)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    finite = np.isfinite(x).all(axis=(1, 2))
    norms = np.linalg.norm(np.where(np.isfinite(x), x, 0.0), axis=-1)
    return ~(finite & (np.abs(norms - 1.0) <= tol).all(axis=1))


def row_problem(x: np.ndarray) -> str:
    """What is wrong with one bad row, in words: 'non-finite', 'zero-norm' or 'non-unit (norm 3.2)'."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    if not np.isfinite(x).all():
        return "non-finite"
    norms = np.linalg.norm(x, axis=-1)
    worst = float(norms[np.argmax(np.abs(norms - 1.0))])
    return "zero-norm" if worst < 1e-6 else f"non-unit (norm {worst:.3g})"


def format_rows(rows, limit: int = 8) -> str:
    """Sorted row ids as ranges, '0, 7, 14-20 ...': at most `limit` ranges, then how many rows in all."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        return "none"
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = [(int(r[0]), int(r[-1])) for r in np.split(rows, cuts)]
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return text + (f", ... ({len(rows)} rows in all)" if len(runs) > limit else "")


@dataclass(frozen=True)
class Problem:
    """Rows of one teacher's modality that failed one check."""

    teacher: str
    modality: str
    kind: str  # "checksum" | "unreadable" | "non-finite" | "not unit-norm" | "mismatch"
    rows: np.ndarray
    detail: str = ""  # "mismatch": what differs

    def __str__(self) -> str:
        what = {
            "checksum": "checksum mismatch (the bytes changed on disk after they were written)",
            "unreadable": "unreadable (damaged file)",
            "non-finite": "non-finite values (NaN/inf)",
            "not unit-norm": f"not unit vectors (|norm - 1| > {NORM_TOL})",
            "mismatch": self.detail,
        }[self.kind]
        who = f"teacher {self.teacher!r} " if self.teacher else ""
        where = f" rows {format_rows(self.rows)}" if len(self.rows) else ""
        return f"{who}{self.modality}{where}: {what}"


@dataclass
class VerifyReport:
    path: str
    rows: int
    teachers: list[str]
    checked: dict[str, int] = field(default_factory=dict)  # teacher -> done rows checked
    checksummed: dict[str, bool] = field(default_factory=dict)  # teacher -> feature datasets have fletcher32
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def advice(self) -> str:
        names = sorted({p.teacher for p in self.problems if p.teacher})
        if not names:  # keys, bad records or views: the file's own datasets
            return (
                f"what to do: restore {self.path} and its segment folder from a backup, or move them away and "
                f"rebuild with `distill cache` (same --data, --teacher and --out)"
            )
        drop = "; ".join(f"del f['{L.teacher(t)}']" for t in names)
        return (
            f"what to do: `distill cache --retry-bad` cannot repair rows marked done; restore {self.path} from a "
            f"backup, or delete the damaged teacher group(s) (python: with h5py.File(PATH, 'r+') as f: {drop}) "
            f"and rerun `distill cache` with the same --teacher NAME=SPEC to recompute only them, or delete the "
            f"file and rebuild it"
        )

    def __str__(self) -> str:
        if self.ok:
            sums = "checksums, " if all(self.checksummed.values()) else "no checksums in this (older) file, "
            return (
                f"verified: {self.rows} rows x {len(self.teachers)} teachers OK ({sums}finite, unit-norm, "
                f"statistics re-derived, keys, done flags, bad records and views read; "
                f"{', '.join(f'{t}: {n} done' for t, n in self.checked.items())})"
            )
        lines = [f"{self.path}: {len(self.problems)} problem(s) found"]
        lines += [f"  {p}" for p in self.problems]
        lines.append(self.advice())
        return "\n".join(lines)


def _unreadable_kind(e: OSError, ds: h5py.Dataset | None = None) -> str:
    """'checksum' when HDF5's filter pipeline (fletcher32, the only filter we write) refused the chunk."""
    text = str(e).lower()
    filtered = "filter" in text and ds is not None and L.checksummed(ds)
    return "checksum" if filtered or "fletcher32" in text or "checksum" in text else "unreadable"


def read_block(ds: h5py.Dataset, lo: int, hi: int) -> tuple[np.ndarray, dict[str, list[int]]]:
    """ds[lo:hi] with unreadable rows as NaN, and {kind: rows} of those rows (narrowed to HDF5 chunks; in a
    virtual dataset, whose rows need not line up with its segments' chunks, then to single rows)."""
    try:
        return ds[lo:hi], {}
    except OSError:
        pass
    out = np.full((hi - lo, *ds.shape[1:]), np.nan, dtype=np.float32)
    bad: dict[str, list[int]] = {}
    step = L.chunk_rows_of(ds)
    start = lo - lo % step
    for s in range(start, hi, step):
        a, b = max(s, lo), min(s + step, hi)
        try:
            out[a - lo : b - lo] = ds[a:b]
        except OSError as e:
            if not ds.is_virtual or b - a == 1:
                bad.setdefault(_unreadable_kind(e, ds), []).extend(range(a, b))
                continue
            part, more = read_block_rows(ds, a, b)
            out[a - lo : b - lo] = part
            for kind, rows in more.items():
                bad.setdefault(kind, []).extend(rows)
    return out, bad


def read_block_rows(ds: h5py.Dataset, lo: int, hi: int) -> tuple[np.ndarray, dict[str, list[int]]]:
    """ds[lo:hi] read row by row: unreadable rows NaN, and {kind: rows} of them."""
    out = np.full((hi - lo, *ds.shape[1:]), np.nan, dtype=np.float32)
    bad: dict[str, list[int]] = {}
    for r in range(lo, hi):
        try:
            out[r - lo] = ds[r]
        except OSError as e:
            bad.setdefault(_unreadable_kind(e, ds), []).append(r)
    return out, bad


def verify(path: str, block_rows: int = 8192, progress: bool | None = None) -> VerifyReport:
    """Read every row of every teacher: checksums (all rows), finiteness and unit norms (done rows).

    progress: a tqdm bar (None: only when stderr is a terminal).
    """
    if not os.path.isfile(path):
        raise CacheError(f"{path} not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise_damaged(path, e)
    with f:
        check_root(f, path)
        n = int(f.attrs[L.Root.NUM_ROWS])
        names = list(f[L.TEACHERS])
        report = VerifyReport(path, n, names)
        sets = sum(len(MODALITIES) + (L.tokens(t) in f) for t in names)
        bar = tqdm(
            total=n * sets,
            desc="verify",
            unit="row",
            dynamic_ncols=True,
            disable=None if progress is None else not progress,
        )
        try:
            report.problems += _verify_other(f, names)
            bad_mask = np.zeros(n, bool)
            if L.BAD in f:
                bad_mask[f[L.BAD_ROWS][:]] = True  # readable: checked just above
            for name in names:
                g = f[L.teacher(name)]
                try:
                    done = g[L.DONE][:]
                except OSError as e:
                    report.problems.append(Problem(name, "done flags", _unreadable_kind(e), np.arange(n)))
                    continue
                report.checked[name] = int(done.sum())
                report.checksummed[name] = all(L.checksummed(g[m]) for m in MODALITIES)
                stats = StatsCheck(
                    done & ~bad_mask,
                    summed_rows(path, g),
                    max(1, int(g.attrs.get("views", 0))),
                    complete=bool((done | bad_mask).all()),
                )
                for m in MODALITIES:
                    report.problems += _verify_dataset(name, m, g[m], done, block_rows, bar, stats=stats)
                report.problems += [
                    Problem(name, ds, "mismatch", np.zeros(0, np.int64), why) for ds, why in stats.problems(g)
                ]
                if L.TOKENS in g:  # patch tokens: checksums and finiteness (they are not unit vectors)
                    ds = g[L.TOKENS]
                    rows = max(1, TOKEN_BLOCK_BYTES // (int(np.prod(ds.shape[1:])) * 4))
                    report.problems += _verify_dataset(name, "patch tokens", ds, done, rows, bar, unit=False)
        finally:
            bar.close()
    return report


def _verify_other(f: h5py.File, names: list[str]) -> list[Problem]:
    """Read every other dataset the trainer reads, whole: keys, bad-sample records, view parameters, done flags
    and statistics (their checksums, where the file has them, are checked by the read)."""
    paths = [L.KEYS, L.BAD_ROWS, L.BAD_KEYS, L.BAD_REASONS, L.VIEW_PARAMS]
    for name in names:
        paths.append(L.done(name))
        paths += [f"{L.stats(name)}/{k}" for k in L.STATS_FIELDS]
    out = []
    for p in paths:
        if p not in f:
            continue
        ds = f[p]
        try:
            if ds.dtype.kind == "O":
                ds.asstr()[:]
            elif ds.ndim and ds.shape[0] > 0:
                _whole(ds)
            else:
                ds[()]
        except (OSError, UnicodeDecodeError) as e:
            teacher = p.split("/")[1] if p.startswith(L.TEACHERS + "/") else ""
            kind = _unreadable_kind(e, ds) if isinstance(e, OSError) else "unreadable"
            out.append(Problem(teacher, p, kind, np.zeros(0, np.int64)))
    return out


def _whole(ds: h5py.Dataset) -> None:
    """Read `ds` in blocks of whole chunks; raise at the first that cannot be read (its checksum, or damage)."""
    c = max(1, L.chunk_rows_of(ds))
    step = c * max(1, (64 << 20) // (ds.dtype.itemsize * int(np.prod(ds.shape[1:])) * c))  # about 64 MiB a read
    for lo in range(0, ds.shape[0], step):
        ds[lo : lo + step]


def _verify_dataset(
    name: str,
    modality: str,
    ds: h5py.Dataset,
    done: np.ndarray,
    block_rows: int,
    bar,
    unit: bool = True,
    stats: StatsCheck | None = None,
) -> list[Problem]:
    c = L.chunk_rows_of(ds)
    step = max(c, block_rows // c * c)  # whole chunks per block: each chunk is read (and checksummed) once
    found: dict[str, list[np.ndarray]] = {}
    for lo in range(0, ds.shape[0], step):
        hi = min(ds.shape[0], lo + step)
        x, unreadable = read_block(ds, lo, hi)
        for kind, rows in unreadable.items():
            found.setdefault(kind, []).append(np.asarray(rows, dtype=np.int64))
        skip = np.zeros(hi - lo, dtype=bool)
        for rows in unreadable.values():
            skip[np.asarray(rows) - lo] = True
        sel = done[lo:hi] & ~skip
        if stats is not None:
            use = stats.usable[lo:hi]
            stats.complete &= not (use & skip).any()  # an unreadable usable row: nothing to compare with
            stats.add(modality, np.asarray(x[use & ~skip], dtype=np.float32))
        if sel.any():
            xs = np.asarray(x[sel], dtype=np.float32)
            bad = bad_row_mask(xs) if unit else ~np.isfinite(xs.reshape(len(xs), -1)).all(1)
            if bad.any():
                bad_rows = np.flatnonzero(sel)[bad] + lo
                if stats is not None:  # the rows are reported: statistics over them are not compared
                    stats.complete &= not stats.usable[bad_rows].any()
                finite = np.isfinite(xs[bad].reshape(int(bad.sum()), -1)).all(axis=1)
                found.setdefault("non-finite", []).append(bad_rows[~finite])
                found.setdefault("not unit-norm", []).append(bad_rows[finite])
        bar.update(hi - lo)
    order = ("checksum", "unreadable", "non-finite", "not unit-norm")
    return [
        Problem(name, modality, k, np.concatenate(found[k]))
        for k in order
        if k in found and sum(len(r) for r in found[k]) > 0
    ]


def raise_damaged(path: str, e: OSError, hint: str = "") -> NoReturn:
    """Re-raise an OS refusal (errno set: permission, no space, read-only) as it is, since the file may be fine;
    anything else HDF5 raises on open or read means the file is damaged: CacheError naming it and what to do."""
    if e.errno is not None:
        raise e
    raise CacheError(damaged_message(path, e) + hint) from e


def damaged_message(path: str, e: BaseException) -> str:
    """The one-line message for a cache file HDF5 cannot open or read (truncated, overwritten, not HDF5)."""
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (
        f"{path} is damaged: HDF5 cannot read it ({detail}); rebuild it with `distill cache` (same --data, "
        f"--teacher and --out), or restore it from a backup"
    )


class BadRowsError(CacheError):
    """Some teacher rows read for training are unreadable, non-finite or not unit vectors (the cache is damaged).

    Built with `BadRowsError.of(...)`; `__init__` takes only the message so that the error survives being
    re-raised from a DataLoader worker (PyTorch rebuilds it as `type(message)`).
    """

    path: str = ""
    teacher: str = ""
    modality: str = ""
    rows: tuple[int, ...] = ()
    problem: str = ""

    @classmethod
    def of(cls, path: str, teacher: str, modality: str, rows, problem: str, hint: str = "") -> BadRowsError:
        rows = tuple(int(r) for r in np.unique(np.asarray(rows, dtype=np.int64)))
        e = cls(
            f"{path}: teacher {teacher!r} {modality} features of cache rows {format_rows(rows)} are {problem}; "
            f"run `distill info --verify {path}` to list every bad row, then restore the file or rebuild that "
            f"teacher{hint}"
        )
        e.path, e.teacher, e.modality, e.rows, e.problem = path, teacher, modality, rows, problem
        return e


UNREADABLE = "unreadable (checksum mismatch or damaged file)"
