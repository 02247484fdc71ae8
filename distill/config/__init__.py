"""Training configuration: the validated pydantic models, YAML files, dotted command-line overrides, term
options and the usage text. Imported before torch: nothing here may import it at module level."""
