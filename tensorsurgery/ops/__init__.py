"""The operations a recipe (:mod:`tensorsurgery.ops.recipe`) may apply, one per output tensor, and
their registry. An operation is a frozen dataclass (hashable: equal operations on equal inputs
make equal bytes); adding one is a module here that defines it and registers it.

What the interpreter may ask of an operation, and all it may ask:

* ``label``: one word for ``plan``, the record and the model card;
* ``verbatim``: its output is its one input's bytes (copied with no computation at all);
* ``elementwise``: output element ``i`` depends on element ``i`` of each input only (and on
  ``i`` itself, which :meth:`Operation.apply` is told); then :meth:`Operation.apply` makes any
  element range on its own, and the writer spreads ranges over threads;
* :meth:`Operation.result_dtype`: the dtype of the values it makes (the interpreter casts them
  to the output's dtype);
* ``rowwise`` (optional, :class:`RowwiseOperation`): output row ``i`` is made of rows of the
  inputs alone; then :meth:`RowwiseOperation.rows_into` makes any row range on its own, and the
  writer spreads ranges over threads as it does element ranges (a dequantization); an optional
  ``job_rows`` asks for ranges of at least that many rows (a LoRA merge makes its product over
  windows of 128 rows: a range of fewer makes the window's product all the same);
* ``two_pass`` (optional, :class:`TwoPassOperation`): element ``i`` depends on element ``i`` of
  each input and on a statistic of the whole input tensors (slerp's norms and angle, ties' top-k
  threshold); :meth:`TwoPassOperation.prepare` reads the inputs once, in bounded blocks, for the
  statistic and returns the elementwise operation with it bound, which the writer then spreads
  over threads like any other;
* :meth:`Operation.chunks`: for an operation that is none of these, its values in bounded
  chunks, reading its inputs itself, in order (a random stream that must be consumed in order).
"""
from tensorsurgery.ops.arcee_fusion import ArceeFusion  # the operations register themselves on import
from tensorsurgery.ops.base import OPERATIONS, Operation, RowwiseOperation, TwoPassOperation, register
from tensorsurgery.ops.breadcrumbs import Breadcrumbs
from tensorsurgery.ops.copy import COPY, Copy
from tensorsurgery.ops.dare import Dare
from tensorsurgery.ops.della import Della
from tensorsurgery.ops.dequant_fp8 import DequantFP8
from tensorsurgery.ops.dequant_mxfp4 import DequantMXFP4
from tensorsurgery.ops.karcher import Karcher
from tensorsurgery.ops.linear import Linear
from tensorsurgery.ops.lora import LoraBias, LoraMerge
from tensorsurgery.ops.lora_experts import LoraExperts
from tensorsurgery.ops.model_stock import ModelStock
from tensorsurgery.ops.multislerp import Multislerp
from tensorsurgery.ops.nearswap import NearSwap
from tensorsurgery.ops.nuslerp import Nuslerp
from tensorsurgery.ops.permute import PermuteRotary, rotary_row_order
from tensorsurgery.ops.ram import Ram, RamPlus
from tensorsurgery.ops.scale import Scale
from tensorsurgery.ops.sce import Sce
from tensorsurgery.ops.slerp import Slerp
from tensorsurgery.ops.task_arithmetic import TaskArithmetic
from tensorsurgery.ops.ties import Ties
from tensorsurgery.ops.zeros import ZEROS, Zeros

__all__ = ["COPY", "OPERATIONS", "ZEROS", "ArceeFusion", "Breadcrumbs", "Copy", "Dare", "Della", "DequantFP8",
           "DequantMXFP4", "Karcher", "Linear", "LoraBias", "LoraExperts", "LoraMerge", "ModelStock", "Multislerp",
           "NearSwap", "Nuslerp", "Operation", "PermuteRotary", "Ram", "RamPlus", "RowwiseOperation", "Scale", "Sce",
           "Slerp", "TaskArithmetic", "Ties", "TwoPassOperation", "Zeros", "register", "rotary_row_order"]
