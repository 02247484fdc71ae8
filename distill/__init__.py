"""biomed-distill: distil biomedical CLIP teachers into one BiomedCLIP-architecture student.

The top room: it may import `teachers`, `cache` and `student`; none of them imports it. Kept import-light:
the version is the installed distribution's (pyproject.toml), read without importing torch.
"""

from teachers.kernel.version import package_version as _package_version

__version__ = _package_version()
