"""Format version, attributes and compatibility checks of the feature cache (its tree: `cache.store.layout`).

Every check here raises `CacheError` with the file named and what to do, before anything is written.
"""

from __future__ import annotations

import os

import numpy as np

from cache.store.layout import Root
from teachers.kernel.version import package_version
from teachers.registry import resolve_spec

FORMAT = "biomed-distill-features"
VERSION = 2  # 2: teacher features, keys and views in segment files mapped by virtual datasets (`cache.store.layout`)
READABLE_VERSIONS = (1, 2)  # 1: everything inside the one file; read, trained on and resumed as before

TEACHER_ATTRS = (
    "spec",
    "resolved_spec",
    "embed_dim",
    "logit_scale",
    "logit_bias",
    "trust_remote_code",
    "image_size",
    "mean",
    "std",
    "interpolation",
    "resize_mode",
    "context_length",
    "views",
)
DTYPES = {"float16": np.float16, "float32": np.float32}


class CacheError(RuntimeError):
    """The cache cannot be (re)built as asked: wrong corpus, conflicting teacher, lock held, bad format."""

    def __init__(self, *args):
        # Raised in a DataLoader worker, PyTorch re-raises it in the main process as type(text) where text is
        # "Caught CacheError in DataLoader worker ... Original Traceback ...": keep only our one-line message.
        if len(args) == 1 and isinstance(args[0], str) and "Original Traceback" in args[0]:
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            if marker in args[0]:
                args = (args[0].rsplit(marker, 1)[1].strip(),)
        super().__init__(*args)


def str_dtype():
    import h5py  # noqa: PLC0415 (lazy: h5py kept off the light CLI path, which loads this module)

    return h5py.string_dtype("utf-8")


def created_by() -> str:
    return f"biomed-distill {package_version()}"


def storage_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise CacheError(f"dtype {name!r} not supported; use one of {', '.join(DTYPES)}")
    return np.dtype(DTYPES[name])


def resolved(spec: str) -> str:
    """The spec an alias stands for, so `biomedclip` and its hf-hub: spec count as the same teacher."""
    try:
        s = resolve_spec(spec)
        return f"{s.kind}:{s.target}"
    except (ValueError, KeyError):
        return spec


def check_root(f, path: str, fingerprint: str | None = None, num_rows: int | None = None) -> None:
    """Refuse a file that is not ours, of another version, or built from another corpus."""
    fmt, ver = f.attrs.get(Root.FORMAT), f.attrs.get(Root.VERSION)
    if fmt != FORMAT:
        raise CacheError(
            f"{path} is not a biomed-distill feature cache (format attr {fmt!r}); choose another --out path"
        )
    if ver is None or int(ver) not in READABLE_VERSIONS:
        raise CacheError(
            f"{path} has cache format version {ver}; this package reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if fingerprint is not None and f.attrs[Root.FINGERPRINT] != fingerprint:
        raise CacheError(
            f"{path} was built from another corpus (fingerprint {f.attrs[Root.FINGERPRINT][:12]}..., this "
            f"corpus {fingerprint[:12]}...: keys or captions differ); refusing to mix them. Write to a new --out "
            "file, or delete the old one to rebuild"
        )
    if num_rows is not None and int(f.attrs[Root.NUM_ROWS]) != num_rows:
        raise CacheError(f"{path} has {int(f.attrs[Root.NUM_ROWS])} rows, the corpus {num_rows}")
    check_sources(f, path)


def virtual_sources(f) -> set[str]:
    """Every source file name (as stored: relative to the file's folder) of the virtual datasets in `f`."""
    import h5py  # noqa: PLC0415 (lazy: h5py kept off the light CLI path, which loads this module)

    names: set[str] = set()

    def visit(_, obj) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            plist = obj.id.get_create_plist()
            names.update(plist.get_virtual_filename(i) for i in range(plist.get_virtual_count()))

    f.visititems(visit)
    names.discard(".")  # a source in the file itself
    return names


def check_sources(f, path: str) -> None:
    """Refuse a format-2 file whose segment files are not beside it: HDF5 would read their rows as its fill value
    (NaN) without a word, so a file copied or moved without its folder is named here, with the fix."""
    base = os.path.dirname(os.path.abspath(path))
    missing = sorted(n for n in virtual_sources(f) if not os.path.isfile(os.path.join(base, n)))
    if missing:
        folder = os.path.dirname(missing[0]) or "."
        raise CacheError(
            f"{path} maps its features from {len(missing)} file(s) that are not there, e.g. "
            f"{os.path.join(base, missing[0])}; a cache is the file and its folder {folder}/ side by "
            "side: copy or move both (`cache.store.segments.copy_cache`), or restore the folder"
        )


def teacher_attrs(describe: dict, views: int, tokens: int = 0, token_dim: int = 0) -> dict:
    """The group attrs of one teacher: `Teacher.describe()` plus the resolved spec and the number of views; with
    patch tokens (`--tokens G`) also `tokens` (G) and `token_dim` (the vision width)."""
    out = {
        k: describe[k]
        for k in (
            "spec",
            "embed_dim",
            "logit_scale",
            "logit_bias",
            "trust_remote_code",
            "context_length",
            "image_size",
            "mean",
            "std",
            "interpolation",
            "resize_mode",
        )
        if k in describe
    }  # logit_bias: sigmoid (SigLIP) teachers only
    out["resolved_spec"] = resolved(describe["spec"])
    out["views"] = int(views)
    if tokens:
        out["tokens"], out["token_dim"] = int(tokens), int(token_dim)
    return out


def check_teacher(path: str, name: str, existing: dict, spec: str, views: int, dtype: str, tokens: int = 0) -> None:
    """Refuse reusing teacher NAME with another spec, number of views, token grid or storage dtype."""
    old_spec = str(existing.get("spec"))
    if resolved(old_spec) != resolved(spec):
        raise CacheError(
            f"{path}: teacher {name!r} already exists with spec {old_spec!r}, not {spec!r}; "
            f"use another name (--teacher OTHER={spec}) or write to a new file"
        )
    if int(existing.get("views", 0)) != int(views):
        raise CacheError(
            f"{path}: teacher {name!r} was cached with views={int(existing.get('views', 0))}, "
            f"this run asks views={views}; rerun with --views {int(existing.get('views', 0))} "
            "or use another teacher name"
        )
    old_tokens = int(existing.get("tokens", 0))
    if old_tokens != int(tokens):
        had = f"--tokens {old_tokens}" if old_tokens else "no --tokens"
        raise CacheError(
            f"{path}: teacher {name!r} was cached with {had}, this run asks "
            f"{f'--tokens {tokens}' if tokens else 'none'}; rerun with "
            f"{f'--tokens {old_tokens}' if old_tokens else 'no --tokens'} or use another teacher name"
        )
    old_dtype = existing.get("dtype")
    if old_dtype is not None and str(old_dtype) != dtype:
        raise CacheError(
            f"{path}: teacher {name!r} is stored as {old_dtype}, this run asks {dtype}; rerun with --dtype {old_dtype}"
        )


def attrs_to_dict(attrs) -> dict:
    """h5py attrs -> plain Python values (arrays to lists, numpy scalars to Python scalars)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        out[k] = v
    return out
