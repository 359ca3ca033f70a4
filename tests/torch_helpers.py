"""What the torch test modules share: reading an output's tensors with the official reader,
comparing tensors bit for bit, and a run with no network."""
from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors import safe_open

#: An integer dtype of each float dtype's width, to compare tensors by their bits.
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``, read with the official reader."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@contextmanager
def no_network(during: str) -> Iterator[None]:
    """The Hub in offline mode, and any internet connection attempt an AssertionError naming
    ``during``."""
    import huggingface_hub.constants

    connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access during {during}: {address}")
        return connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", guarded)
        yield
