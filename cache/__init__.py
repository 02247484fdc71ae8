"""Corpus readers and the HDF5 feature cache (format 2: the layout of cache/store/layout.py, the feature data in
segment files mapped by virtual datasets; v1 files still read).

Public API:
    open_corpus(path) -> Corpus          CSV/TSV/JSONL tables and WebDataset shards (cache.sources.corpus)
    Corpus, BadSampleError, CorpusError
    CacheJob, build_cache(job) -> CacheSummary   `distill cache` (cache.build.run)
    info(path) -> str                    `distill info` (cache.inspect)
    CorpusSource, build_corpus(sources, out_dir) -> CorpusBuildResult   `distill corpus` (cache.corpus_build)
    FeatureReader                        reading features for training (cache.store.reader)
    CacheError                           refusals: other corpus, spec clash, lock held, bad format
"""

from teachers.kernel.lazy_exports import lazy_exports

# Names load on first use (PEP 562): `cache.build.job` (what `distill cache` validates its flags with) must not
# pay for torch, which `cache.build.run` imports.
_EXPORTS = {
    "build.run": ["CacheJob", "CacheSummary", "TeacherSummary", "build_cache"],
    "sources.corpus": ["BadSampleError", "Corpus", "CorpusError", "open_corpus"],
    "corpus_build": ["CorpusBuildResult", "CorpusSource", "build_corpus"],
    "store.reader": ["FeatureReader"],
    "inspect": ["info"],
    "store.schema": ["CacheError"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
