"""Corpus readers and the HDF5 feature cache (DESIGN.md format v1)."""
