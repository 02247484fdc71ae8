"""Feeding the trainer: the dataset over a corpus joined with its feature cache, samplers (domain balance, resume),
streamed shards and decoding on the device."""
