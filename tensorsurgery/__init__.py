"""tensorsurgery: build new LLM checkpoints out of old ones without instantiating a model.

The public API follows the data flow: manifest -> checkpoints -> plan -> files -> report::

    import tensorsurgery as ts
    plan = ts.plan("manifests/solar-dus.toml", sources={"": "./Mistral-7B-v0.1"})
    result = ts.apply("manifests/solar-dus.toml", sources={"": "./Mistral-7B-v0.1"}, output="out/solar")
    assert ts.verify("out/solar").ok
"""
from __future__ import annotations

import os as _os

# The writer makes tensors on its own threads: OpenBLAS's threads under any numpy linear algebra
# there would only spin against them (a LoRA merge took twice as long when it used BLAS). Set
# before numpy is first imported; a caller's own setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tensorsurgery._version import __version__  # noqa: E402
from tensorsurgery.api import ApplyResult, PushResult, apply, execute, inspect, load, plan, push, resolve, verify
from tensorsurgery.errors import (
    HeaderError,
    ManifestError,
    NotVerifiedError,
    OptionError,
    OutputExistsError,
    PlanError,
    ReadError,
    SourceError,
    TensorSurgeryError,
    VerifyError,
    WriteError,
)
from tensorsurgery.formats.safetensors import Header, read_header
from tensorsurgery.manifest.toml import Manifest
from tensorsurgery.planning.planner import Plan, build_plan
from tensorsurgery.sources.checkpoint import Checkpoint

__all__ = [
    "__version__",
    # the API: one function per command
    "load", "resolve", "plan", "apply", "execute", "verify", "push", "inspect",
    # what it returns
    "Manifest", "Checkpoint", "Plan", "ApplyResult", "PushResult", "VerifyReport", "Header",
    "build_plan", "read_header",
    # what it raises
    "TensorSurgeryError", "OptionError", "ManifestError", "HeaderError", "SourceError", "PlanError",
    "OutputExistsError", "ReadError", "WriteError", "VerifyError", "NotVerifiedError",
]


def __getattr__(name: str) -> object:
    # VerifyReport comes with the verify module, which loads numpy: not needed to plan or inspect.
    if name == "VerifyReport":
        from tensorsurgery.verification.verifier import VerifyReport
        return VerifyReport
    raise AttributeError(f"module 'tensorsurgery' has no attribute {name!r}")
