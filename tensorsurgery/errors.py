"""Every exception tensorsurgery raises on purpose.

The library raises; only :mod:`tensorsurgery.cli` prints. Messages follow one shape:
what failed, where (file, key path or tensor), expected vs found, and what to do.
"""
from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any

#: Whose words a message speaks: the command line's (``--source PATH``), set by the CLI while it
#: runs, or, by default, the Python API's (``sources=PATH``). Messages are written once, in the
#: command line's words; :class:`TensorSurgeryError` says them in the API's unless the CLI runs.
COMMAND_LINE_WORDS: ContextVar[bool] = ContextVar("COMMAND_LINE_WORDS", default=False)

#: The command line's words -> the API's, in order (longer forms first).
_API_WORDS = tuple((re.compile(a), b) for a, b in (
    (r"--source NAME=PATH", 'sources={"NAME": PATH}'),
    (r"--source ([\w.-]+)=\.\.\.", r'sources={"\1": ...}'),
    (r"--source PATH", "sources=PATH"),
    (r"--source\b", "sources="),
    (r"--output PATH", "output=PATH"),
    (r"--output\b", "output="),
    (r"--force\b", "force=True"),
    (r"--resume\b", "resume=True"),
    (r"--link\b", "link=True"),
    (r"--threads (\S+)", r"threads=\1"),
    (r"--threads\b", "threads="),
))


def api_words(message: str) -> str:
    """``message`` with the command line's options named as the Python API's parameters."""
    for pattern, api in _API_WORDS:
        message = pattern.sub(api, message)
    return message


class TensorSurgeryError(Exception):
    """Base class: any error tensorsurgery reports to the user as one line (exit code 2)."""

    def __str__(self) -> str:
        message = super().__str__()
        return message if COMMAND_LINE_WORDS.get() else api_words(message)


class OptionError(TensorSurgeryError, ValueError):
    """A command-line option (or the API argument it stands for) has a value tensorsurgery cannot
    use, such as ``--threads`` out of its range."""


class ManifestError(TensorSurgeryError):
    """The manifest (TOML or mergekit YAML) is unreadable, has an unknown key or a bad value."""


class HeaderError(TensorSurgeryError):
    """A safetensors file breaks one of the format's rules (raised by :mod:`tensorsurgery.formats.safetensors`)."""


class SourceError(TensorSurgeryError):
    """A source checkpoint is missing, inconsistent (index vs shards vs config), unsafe to read
    (a special file, a link out of its folder, an oversized JSON file) or unresolvable."""


class PlanError(TensorSurgeryError):
    """The manifest cannot be applied to these sources (layer out of range, name clash, shapes differ)."""


class QuantizationError(PlanError):
    """A quantized source cannot be dequantized as asked: no block size in its config, a weight
    without its scale tensor, or a scale whose shape does not cover the weight's blocks."""


class AdapterError(PlanError):
    """A LoRA adapter cannot be merged into its source: not a LoRA (or a DoRA whose norm runs over
    columns), a module the base lacks, factors whose shapes do not fit the base tensor, an
    unreadable adapter folder."""


class ConsistencyError(PlanError):
    """The output's config.json and tensors would not describe the same model (a ``[config]``
    override or a rename broke it), or layers come from a source whose config computes them
    otherwise than the one config the output has."""


class NotMovableError(PlanError):
    """Layers of a family the registry does not know would move, but its config.json (or a tensor
    outside the layers) says which layer is which in a way the generic rules cannot rewrite."""


class OutputExistsError(TensorSurgeryError):
    """The output path exists (and ``--force`` was not given or may not replace it), lies inside a
    source, or is not a place an output can be written."""


class ReadError(TensorSurgeryError):
    """A file ended early or changed while its bytes were read (after it was planned)."""


class WriteError(TensorSurgeryError):
    """Writing the output failed (disk full, file too large, not writable)."""


class VerifyError(TensorSurgeryError):
    """The output cannot be verified at all (missing folder, unreadable provenance record)."""


class NotVerifiedError(TensorSurgeryError):
    """The output does not verify, so it was not uploaded; ``report`` holds the differences."""

    def __init__(self, message: str, report: Any):  # a VerifyReport (errors.py imports nothing of ours)
        super().__init__(message)
        self.report = report


class OutputBusyError(TensorSurgeryError):
    """Another tensorsurgery run holds the lock of this output (it is writing it now)."""


class SourceChangedError(SourceError):
    """A source file is not the one that was planned: replaced (by a link or another file) or
    modified between planning and reading it."""
