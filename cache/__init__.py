"""Corpus readers and the HDF5 feature cache (format 2: DESIGN.md's v1 layout, the feature data in segment files
mapped by virtual datasets; v1 files still read).

Public API:
    open_corpus(path) -> Corpus          CSV/TSV/JSONL tables and WebDataset shards (cache.sources.corpus)
    Corpus, BadSampleError, CorpusError
    CacheJob, build_cache(job) -> CacheSummary   `distill cache` (cache.build.run)
    info(path) -> str                    `distill info` (cache.inspect)
    CorpusSource, build_corpus(sources, out_dir) -> CorpusBuildResult   `distill corpus` (cache.corpus_build)
    FeatureReader                        reading features for training (cache.store.reader)
    CacheError                           refusals: other corpus, spec clash, lock held, bad format
"""
from cache.build.run import CacheJob, CacheSummary, TeacherSummary, build_cache
from cache.sources.corpus import BadSampleError, Corpus, CorpusError, open_corpus
from cache.corpus_build import CorpusBuildResult, CorpusSource, build_corpus
from cache.store.reader import FeatureReader
from cache.inspect import info
from cache.store.schema import CacheError

__all__ = ["open_corpus", "Corpus", "BadSampleError", "CorpusError", "CacheJob", "CacheSummary",
           "TeacherSummary", "build_cache", "CorpusSource", "CorpusBuildResult", "build_corpus", "info", "FeatureReader", "CacheError"]
