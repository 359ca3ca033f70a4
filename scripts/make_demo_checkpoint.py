"""Build the tiny synthetic Mistral checkpoint in ``examples/tiny-mistral/`` (the README's demo).

Regenerate from the repository root (offline, no torch needed)::

    python scripts/make_demo_checkpoint.py              # writes examples/tiny-mistral/
    python scripts/make_demo_checkpoint.py OUTDIR --seed 0

It has Mistral-7B's layout (32 decoder layers, grouped-query attention, a sliding window shorter
than ``max_position_embeddings``) at tiny dimensions (:data:`tensorsurgery.synthetic.TINY`), so the
whole folder is about 0.2 MB: bf16 weights in 3 safetensors shards plus
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and a word-level
tokenizer. Values are seeded (``--seed``): the same seed gives the same bytes. The tests build
their fixtures with the same module (``tests/conftest.py``), with other seeds.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the synthetic checkpoints

from synthetic import TINY, make_mistral  # noqa: E402

DEFAULT_OUTDIR = REPO / "examples" / "tiny-mistral"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", type=Path, default=DEFAULT_OUTDIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", type=int, default=60_000, help="bytes of tensor data per shard")
    args = ap.parse_args(argv)
    shutil.rmtree(args.outdir, ignore_errors=True)
    out = make_mistral(args.outdir, TINY, seed=args.seed, max_shard_size=args.max_shard_size)
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>8}  {f.name}")
    print(f"{sum(f.stat().st_size for f in out.iterdir()):>8}  total bytes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
