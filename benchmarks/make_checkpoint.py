#!/usr/bin/env python3
"""Generate a synthetic Mistral-shaped checkpoint in Hugging Face layout, for benchmarks: a thin
command line over ``tests/synthetic.py`` (this checkout's, whichever checkout a benchmark
measures), with raw random bytes as values (the fastest to make; values do not matter here).

Sizes:

* ``--full``: the real Mistral-7B shape (vocab 32000, hidden 4096, intermediate 14336, 32 heads,
  8 KV heads, head_dim 128, 32 layers): 14,483,464,192 bytes of tensors, cut greedily at 10 GB
  (decimal) into two shards of ~9.94 GB and ~4.54 GB, like the real repository.
* default: the same 32 layers and 4:1 head ratio, narrower (hidden 1280, intermediate 4480,
  head_dim 40): 1,527,155,200 bytes, also in two shards (the cut scales with the total so the
  split looks like the real one).

Usage::

    python benchmarks/make_checkpoint.py OUTDIR [--full] [--seed N]
        [--hidden H] [--intermediate I] [--layers L] [--vocab V]
        [--heads N] [--kv-heads N] [--head-dim D] [--max-shard-size BYTES]

or from Python: ``make_checkpoint(outdir, full=False, seed=0, **dims) -> Path`` (and
``tensor_bytes(full, **dims)`` for the size without writing anything).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the synthetic checkpoints

from synthetic import FULL, SMALL, Dims, make_mistral  # noqa: E402
from synthetic import tensor_bytes as _tensor_bytes  # noqa: E402

#: The real repository's shard cut (transformers' default ``max_shard_size="10GB"``).
FULL_MAX_SHARD = 10_000_000_000
#: Refuse to write if fewer than this many bytes would be left free afterwards.
MIN_FREE_AFTER = 5_000_000_000


def dims_of(full: bool = False, **overrides: int | None) -> Dims:
    """The dimensions: Mistral-7B's (``full``) or the narrow default, with ``overrides``."""
    return replace(FULL if full else SMALL, **{k: v for k, v in overrides.items() if v is not None})


def tensor_bytes(full: bool = False, **dims: int | None) -> int:
    """Bytes of tensor data of ``make_checkpoint(full=full, **dims)`` (``layers=48`` gives the size
    of a 48-layer DUS output of the same width)."""
    return _tensor_bytes(dims_of(full, **dims))


def make_checkpoint(outdir: str | Path, full: bool = False, seed: int = 0, *, max_shard_size: int | None = None,
                    **dims: int | None) -> Path:
    """Write the synthetic checkpoint into ``outdir`` (random bf16 bytes, seeded) and return it.

    ``max_shard_size`` defaults to 10 GB for the full shape and otherwise scales with the total
    so that the split resembles the real one (two shards).

    Raises:
        OSError: writing would leave less than 5 GB of free disk.
    """
    d = dims_of(full, **dims)
    total = _tensor_bytes(d)
    if max_shard_size is None:
        max_shard_size = max(1, total * FULL_MAX_SHARD // _tensor_bytes(FULL))
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(outdir).free
    if free - total < MIN_FREE_AFTER:
        raise OSError(f"refusing to write {total / 1e9:.2f} GB to {outdir}: only {free / 1e9:.2f} GB free, and at "
                      f"least {MIN_FREE_AFTER / 1e9:.0f} GB must remain free afterwards")
    return make_mistral(outdir, d, seed=seed, max_shard_size=max_shard_size, values="bytes", tokenizer=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--full", action="store_true", help="real Mistral-7B shape, ~14.5 GB (default: ~1.5 GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tensor bytes (0)")
    for dim in ("hidden", "intermediate", "layers", "vocab", "heads", "kv-heads", "head-dim"):
        p.add_argument(f"--{dim}", type=int, default=None, metavar="N")
    p.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                   help="greedy shard cut (default: 10e9 for --full, else scaled to the total)")
    a = p.parse_args(argv)
    dims = dict(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, vocab=a.vocab, heads=a.heads,
                kv_heads=a.kv_heads, head_dim=a.head_dim)
    t0 = time.perf_counter()
    try:
        out = make_checkpoint(a.outdir, full=a.full, seed=a.seed, max_shard_size=a.max_shard_size, **dims)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {out} ({tensor_bytes(a.full, **dims):,} bytes of tensors) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
