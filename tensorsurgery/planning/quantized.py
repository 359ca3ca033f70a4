"""Which output tensors are dequantized (pure, part of planning): FP8 block-quantized and MXFP4 sources.

A source whose config.json says ``quantization_config.quant_method = "fp8"`` with a
``weight_block_size`` (DeepSeek-V3, Kimi K2, GLM-4.5... ``[128, 128]``) stores each quantized
weight as ``F8_E4M3`` beside a ``<name>_scale_inv`` of one scale per block. When an output dtype
is asked for (``[output] dtype``), every such weight becomes that dtype like every other float
tensor: a recipe of the two tensors and :class:`~tensorsurgery.ops.DequantFP8`; the scale tensors
and ``quantization_config`` leave the output. Without a dtype every tensor keeps its own, so an
FP8 model stays FP8, scales and all (a DUS of DeepSeek-V3 as it was released).

A source whose ``quant_method`` is ``"mxfp4"`` (GPT-OSS) stores each expert tensor ``P`` as
``P_blocks`` and ``P_scales``; with a dtype, ``P`` is made of the two
(:class:`~tensorsurgery.ops.DequantMXFP4`), as transformers dequantizes it.
"""
from __future__ import annotations

from typing import Any, Mapping

from tensorsurgery.errors import QuantizationError
from tensorsurgery.ops import DequantFP8, DequantMXFP4
from tensorsurgery.ops.base import ByteRange, Input
from tensorsurgery.sources.checkpoint import Checkpoint

#: The scale of weight ``W`` is ``W + SCALE_SUFFIX`` (``...q_proj.weight_scale_inv``).
SCALE_SUFFIX = "_scale_inv"
FP8 = "F8_E4M3"
#: GPT-OSS's MXFP4 tensor ``P`` is stored as ``P + MXFP4_BLOCKS`` and ``P + MXFP4_SCALES``.
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
#: What to do with a quantized model that a merge or an adapter is asked of: they compute with
#: floats, and a recipe is one operation, so the dequantization is a run of its own.
DEQUANTIZE_FIRST = ("dequantize the model first (a manifest of it alone, with [output] dtype = \"bfloat16\"), "
                    "then use the dequantized model")

#: Dtypes a scale may have: widened exactly to float32, as torch's ``w.float() * s`` promotes it.
_SCALE_DTYPES = ("F32", "BF16", "F16")


def block_size(config: Mapping[str, Any], where: str) -> tuple[int, int] | None:
    """The ``[rows, cols]`` block of an FP8 block-quantized config, None for any other config.

    Raises:
        QuantizationError: an fp8 ``quantization_config`` without a valid ``weight_block_size``.
    """
    q = config.get("quantization_config")
    if not isinstance(q, Mapping) or q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise QuantizationError(f"{where}: quantization_config is fp8 but its weight_block_size is {block!r}, not "
                                f"[rows, cols]; tensorsurgery dequantizes FP8 weights scaled per block only "
                                f"(DeepSeek-V3's [128, 128]): leave [output] dtype unset to keep the FP8 tensors")
    return block[0], block[1]


def fp8_sources(checkpoints: Mapping[str, Checkpoint], dtype: str | None) -> dict[str, tuple[int, int]]:
    """The block size of every FP8 block-quantized source, when the output has a ``dtype`` (empty
    otherwise: nothing is dequantized)."""
    if dtype is None:
        return {}
    found = {name: block_size(c.config, f"{c.root / 'config.json'}") for name, c in checkpoints.items()}
    return {name: block for name, block in found.items() if block is not None}


def mxfp4_sources(checkpoints: Mapping[str, Checkpoint], dtype: str | None) -> frozenset[str]:
    """The MXFP4-quantized sources (``quantization_config.quant_method = "mxfp4"``: GPT-OSS), when
    the output has a ``dtype`` (none otherwise: nothing is dequantized)."""
    if dtype is None:
        return frozenset()
    quantized = {name: c.config.get("quantization_config") for name, c in checkpoints.items()}
    return frozenset(name for name, q in quantized.items()
                     if isinstance(q, Mapping) and q.get("quant_method") == "mxfp4")


def mxfp4_recipe(blocks: Input, ckpt: Checkpoint, dtype: str,
                 transformed: bool = False) -> tuple[str, tuple[int, ...], tuple[Input, Input], DequantMXFP4]:
    """What makes the MXFP4 ``<P>_blocks`` tensor ``blocks`` of source ``ckpt`` a tensor of
    ``dtype``: the suffix its output name loses, its shape ``[E, G * 32, R]``, its inputs (the
    blocks, then ``<P>_scales``) and the operation.

    Raises:
        QuantizationError: no scales tensor, blocks or scales of the wrong shape or dtype, a
            permuted or sliced tensor.
    """
    where = f"{blocks.range.file.location}: tensor {blocks.key!r}"
    if transformed or blocks.part is not None:
        raise QuantizationError(f"{where}: an MXFP4 tensor cannot also be permuted or sliced; leave [output] dtype "
                                f"unset to keep the MXFP4 tensors, or drop the rename that transforms it")
    key = blocks.key[:-len(MXFP4_BLOCKS)] + MXFP4_SCALES
    shard = ckpt.weight_map.get(key)
    if shard is None:
        raise QuantizationError(f"{where} is MXFP4 blocks but the source has no {key!r} (their scales); the "
                                f"checkpoint is incomplete: download it again, or leave [output] dtype unset")
    header = ckpt.headers[shard]
    entry = header.tensors[key]
    shape = blocks.shape
    if len(shape) != 4 or shape[3] != 16 or entry.shape != shape[:3] or entry.dtype != "U8":
        raise QuantizationError(f"{where}: MXFP4 blocks must be U8 [experts, rows, groups, 16] with U8 scales "
                                f"[experts, rows, groups], found {list(shape)} and {key!r} {entry.dtype} "
                                f"{list(entry.shape)}; tensorsurgery dequantizes GPT-OSS's layout only")
    scales = Input(blocks.source, key, entry.dtype, entry.shape,
                   ByteRange(header.source, header.data_start + entry.start, entry.nbytes))
    return MXFP4_BLOCKS, (shape[0], shape[2] * 32, shape[1]), (blocks, scales), DequantMXFP4(dtype)


def dequant_recipe(weight: Input, ckpt: Checkpoint, block: tuple[int, int], dtype: str,
                   transformed: bool = False) -> tuple[tuple[Input, Input], DequantFP8]:
    """The inputs (the weight, then its scale) and the operation that make the FP8 ``weight`` of
    source ``ckpt`` (quantized in blocks of ``block``) a tensor of ``dtype``; ``transformed``
    says the plan would also permute it.

    Raises:
        QuantizationError: no scale tensor, a scale of another shape than the weight's blocks or
            of a dtype that is not a float, an ``F8_E5M2`` weight, a permuted or sliced weight.
    """
    return (weight, _scale_input(weight, ckpt, block, transformed)), DequantFP8(*block, dtype)


def _scale_input(weight: Input, ckpt: Checkpoint, block: tuple[int, int], transformed: bool) -> Input:
    where = f"{weight.range.file.location}: tensor {weight.key!r}"
    if weight.dtype != FP8:
        raise QuantizationError(f"{where} is {weight.dtype}; tensorsurgery dequantizes {FP8} (e4m3fn) weights only: "
                                f"leave [output] dtype unset to keep the FP8 tensors")
    if transformed or weight.part is not None:
        raise QuantizationError(f"{where}: an FP8 weight cannot also be permuted or sliced; leave [output] dtype "
                                f"unset to keep the FP8 tensors, or drop the rename that transforms it")
    key = weight.key + SCALE_SUFFIX
    shard = ckpt.weight_map.get(key)
    if shard is None:
        raise QuantizationError(f"{where} is {FP8} but the source has no {key!r} (its per-block scale); the "
                                f"checkpoint is incomplete: download it again, or leave [output] dtype unset")
    header = ckpt.headers[shard]
    entry = header.tensors[key]
    expected = tuple(-(-n // b) for n, b in zip(weight.shape, block)) if len(weight.shape) == 2 else None
    if entry.shape != expected or entry.dtype not in _SCALE_DTYPES:
        wanted = f"[{expected[0]}, {expected[1]}]" if expected else "none (the weight is not 2-D)"
        raise QuantizationError(f"{where} {list(weight.shape)} in blocks of {block[0]}x{block[1]} needs a float "
                                f"scale of shape {wanted}, but {key!r} is {entry.dtype} {list(entry.shape)}; the "
                                f"weight_block_size of config.json does not describe this checkpoint")
    return Input(weight.source, key, entry.dtype, entry.shape,
                 ByteRange(header.source, header.data_start + entry.start, entry.nbytes))


def without_quantization(config: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Take ``quantization_config`` out of a dequantized output's config.json (and its
    sub-configs'), unless ``[config]`` sets it; the dtype keys already say the output's dtype."""
    for d in (config, *(v for v in config.values() if isinstance(v, dict))):
        if "quantization_config" not in overrides or d is not config:
            d.pop("quantization_config", None)
