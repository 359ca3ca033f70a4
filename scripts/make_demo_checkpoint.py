"""Build the tiny random Mistral checkpoint in ``examples/tiny-mistral/``.

Regenerate (from the repository root, offline; needs torch, transformers 5.x and tokenizers)::

    python scripts/make_demo_checkpoint.py              # writes examples/tiny-mistral/
    python scripts/make_demo_checkpoint.py OUTDIR --seed 0 --max-shard-size 60KB

The result is a real ``MistralForCausalLM`` checkpoint with Mistral-7B's layout (32 decoder
layers, grouped-query attention, a sliding window shorter than ``max_position_embeddings``) but
tiny dimensions, so the whole folder is about 0.2 MB: bf16 weights in 3 safetensors shards plus
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and a word-level
tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``).

Determinism: every weight is drawn from a ``torch.Generator`` seeded with ``--seed``, walking the
tensor names in sorted order on the CPU, so the values do not depend on transformers' own init
code; the tokenizer is built from a fixed word list. The files are byte-identical across runs with
the same torch/transformers versions (``config.json`` and ``generation_config.json`` record
``transformers_version``). The test suite builds its fixtures with :func:`build_tiny_mistral` from
this file (``tests/conftest.py``), with other seeds.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTDIR = REPO / "examples" / "tiny-mistral"
DEFAULT_SEED = 0
#: With the dimensions below the weights are ~156 KB of bf16, so 60 KB gives 3 shards.
DEFAULT_MAX_SHARD_SIZE = "60KB"

#: Tiny Mistral-7B look-alike: same structure (GQA, head_dim set, sliding window < max positions).
TINY_MISTRAL_CONFIG = dict(
    vocab_size=96,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    sliding_window=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
#: Tokenizer vocabulary after the special tokens (fewer than ``vocab_size``: the rows beyond
#: the tokenizer are padding, as in many real checkpoints).
WORDS = (
    "the a an of to and in is it that on for with as was at by from this be "
    "model layer layers depth up scaling mistral llama solar tensor tensors weight "
    "shard safetensors surgery copy merge split token small tiny random seed test "
    ". , ! ? : ; ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()


def build_tokenizer(model_max_length: int = 64):
    """A word-level ``PreTrainedTokenizerFast`` built offline: ``<unk>``=0, ``<s>``=1, ``</s>``=2.

    Lower-cased, whitespace/punctuation pre-tokenization, a ``<s>`` prepended to every sequence (like
    Mistral's tokenizer), unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _random_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values, in sorted-name order.

    Norm weights are ``1 + N(0, 0.1)`` (not all ones, so every layer is distinguishable by all
    of its tensors), matrices ``N(0, 1/fan_in)`` and the embedding ``N(0, 1)``: activations stay
    O(1) through 32 layers and different layer arrangements give clearly different logits.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("embed_tokens.weight"):
                value = noise
            else:
                value = noise / math.sqrt(p.shape[-1])
            p.copy_(value.to(p.dtype))


def build_tiny_mistral(
    outdir: str | Path,
    seed: int = DEFAULT_SEED,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    with_tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Write a tiny random ``MistralForCausalLM`` checkpoint into ``outdir``; return it as a Path.

    ``max_shard_size`` goes to ``save_pretrained`` (decimal units: "60KB" = 60 000 bytes of
    tensor data per shard; headers come on top). Pass a large value (e.g. "1GB") to get a single
    ``model.safetensors`` without an index. ``config_overrides`` update
    :data:`TINY_MISTRAL_CONFIG` (e.g. ``num_hidden_layers=8``).
    """
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    params = {**TINY_MISTRAL_CONFIG, **config_overrides}
    # transformers 5 moved rope_theta into rope_parameters; pass it in the new form.
    params["rope_parameters"] = {"rope_type": "default", "rope_theta": params.pop("rope_theta")}
    config = MistralConfig(**params)

    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    _random_weights(model, seed)
    model = model.to(dtype).eval()
    # Set explicitly rather than relying on what is derived from the model config.
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    model.save_pretrained(outdir, max_shard_size=max_shard_size)

    if with_tokenizer:
        tokenizer = build_tokenizer(model_max_length=config.max_position_embeddings)
        tokenizer.save_pretrained(outdir)
        # transformers 5 records tokenizer_class "TokenizersBackend", which transformers 4 cannot
        # resolve; "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
        tok_cfg_path = outdir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
        special = outdir / "special_tokens_map.json"
        if not special.exists():  # transformers 5 no longer writes this file; older tools read it
            special.write_text(json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2,
            ) + "\n")
    return outdir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", type=Path, default=DEFAULT_OUTDIR)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    args = ap.parse_args(argv)
    if args.outdir.is_dir():  # drop stale shards of an earlier layout (only weight files)
        for f in [*args.outdir.glob("model*.safetensors"), args.outdir / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)
    out = build_tiny_mistral(args.outdir, args.seed, max_shard_size=args.max_shard_size)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>8}  {f.name}")
    print(f"{total:>8}  total bytes in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
