"""Corpus sources: every format a corpus or a labelled data set is read from (tables, WebDataset shards local or
streamed, MedMNIST npz, class folders), each one module registered by name in `cache.sources.formats`, image
decoding with its limits, and the synthetic corpus. Imports nothing else of `cache`."""
