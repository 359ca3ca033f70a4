"""tensorsurgery: build new LLM checkpoints out of old ones without instantiating a model.

The public API follows the data flow: manifest -> checkpoints -> plan -> files -> report.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (HeaderError, ManifestError, OutputExistsError, PlanError, SourceError,  # noqa: E402
                     TensorSurgeryError, VerifyError, WriteError)
from .format import read_header  # noqa: E402
from .manifest import load_manifest  # noqa: E402
from .plan import build_plan  # noqa: E402
from .source import load_checkpoint  # noqa: E402

__all__ = [
    "__version__", "load_manifest", "load_checkpoint", "read_header", "build_plan",
    "TensorSurgeryError", "ManifestError", "HeaderError", "SourceError", "PlanError",
    "OutputExistsError", "WriteError", "VerifyError",
]
