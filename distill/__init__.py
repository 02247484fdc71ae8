"""biomed-distill: distil biomedical CLIP teachers into one BiomedCLIP-architecture student.

Kept import-light on purpose: `teachers/`, `cache/` and `student/` import `distill.registry` and
`distill.__version__` without pulling in the trainer.
"""
__version__ = "0.1.0"
