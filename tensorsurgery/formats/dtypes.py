"""The one table of tensor dtypes: safetensors codes, their width, their torch names, and which
ones a cast can convert (the float formats whose bit-exact conversion :mod:`tensorsurgery.ops.transforms`
implements)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

#: Bits per element of every dtype the official safetensors reader knows.
DTYPE_BITS: Mapping[str, int] = MappingProxyType({
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
})

#: The dtypes a cast converts between, by their torch / config.json name (``output.dtype``).
CAST_DTYPES: Mapping[str, str] = MappingProxyType({"float16": "F16", "bfloat16": "BF16", "float32": "F32"})

#: Safetensors code -> torch / config.json name, for the castable dtypes.
TORCH_NAMES: Mapping[str, str] = MappingProxyType({code: name for name, code in CAST_DTYPES.items()})


def is_castable(code: str) -> bool:
    """True for the float dtypes a cast converts (F16, BF16, F32); other tensors are never cast."""
    return code in TORCH_NAMES


def element_size(code: str) -> int:
    """Bytes per element of a whole-byte dtype (``"BF16"`` -> 2).

    Raises:
        KeyError: an unknown dtype, or one narrower than a byte (F4, F6_*).
    """
    bits = DTYPE_BITS[code]
    if bits % 8:
        raise KeyError(f"{code} elements are not whole bytes")
    return bits // 8
