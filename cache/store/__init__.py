"""The HDF5 feature store: its layout and schema, segment files and their writer, the merge into virtual datasets,
the writer lock, the reader used by training, and verification. Imports nothing else of `cache`."""
