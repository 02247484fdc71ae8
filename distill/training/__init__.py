"""The training loop's parts: building a run, the student with its heads, optimiser and schedule, GradCache,
checkpoints and their loading, RNG state, the run lock, collectives and the per-step log."""
