"""The shared kernel every room may import: the plug-in `Registry`, lazy exports, the package version, the
modality names and the bounded YAML loader. Imports nothing else of the project."""
