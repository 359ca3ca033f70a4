"""mergekit's ``tokenizer_source`` (``base``, ``union`` or a model) for a merge, where it leaves the
embeddings as they are.

With a ``tokenizer_source`` mergekit builds the output's tokenizer (the base's, the union of every
model's vocabulary, or the named model's), re-assembles every model's embedding and lm_head rows in
that tokenizer's order, trims them to its token count and writes the tokenizer with
``save_pretrained``. When every merged model has the same vocabulary (token -> id, as
``tokenizer.get_vocab()`` gives it: ``tokenizer.json``'s model vocabulary and added tokens, those
at or past ``vocab_size`` stripped) and that vocabulary numbers every embedding row, the common case
of fine-tunes of one base, the re-assembly is the identity: the merge is the plain merge, with the
tokenizer files of the source mergekit takes them from. Anything else re-orders or trims rows, and
is refused in one line until it is built.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tensorsurgery.errors import PlanError, SourceError
from tensorsurgery.io.fsio import read_json, sha256_file
from tensorsurgery.sources.checkpoint import Checkpoint

TOKENIZER_JSON = "tokenizer.json"
#: The copied files (:data:`tensorsurgery.sources.checkpoint.COPIED_FILES`) that make up a tokenizer: the
#: output takes these from the tokenizer's source, the rest from the base.
TOKENIZER_FILES = re.compile(r"tokenizer[\w.-]*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
                             r"|merges\.txt|chat_template\.(json|jinja)|tekken\.json|[^/]*\.tiktoken")
#: tokenizer.json of a large vocabulary is tens of MB (Gemma 3's: 33 MB).
TOKENIZER_LIMIT = 128 << 20


def vocabulary(ckpt: Checkpoint, name: str) -> dict[str, int]:
    """Source ``name``'s vocabulary (token -> id) as ``get_vocab()`` gives it, from its
    ``tokenizer.json``, without the ids at or past its config's ``vocab_size`` (mergekit strips them).

    Raises:
        PlanError: no tokenizer.json, or one that is not a Hugging Face tokenizer.
    """
    if TOKENIZER_JSON not in ckpt.extra_files:
        raise PlanError(f"source {name!r}: no {TOKENIZER_JSON}, so its vocabulary cannot be compared with the other "
                        f"models' (tokenizer_source needs it); remove tokenizer_source, or add the file")
    data = read_json(ckpt.root / TOKENIZER_JSON, limit=TOKENIZER_LIMIT, inside=ckpt.inside)
    try:
        vocab = _model_vocabulary(data["model"])
        vocab.update({str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or ()})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SourceError(f"{ckpt.root / TOKENIZER_JSON}: not a Hugging Face tokenizer (no model vocabulary); "
                          f"re-download it") from None
    size = _vocab_size(ckpt.config)
    return {t: i for t, i in vocab.items() if size is None or i < size}


def _digest(ckpt: Checkpoint) -> str | None:
    if TOKENIZER_JSON not in ckpt.extra_files:
        return None
    return sha256_file(ckpt.root / TOKENIZER_JSON, inside=ckpt.inside)


def _model_vocabulary(model: Mapping[str, Any]) -> dict[str, int]:
    vocab = model["vocab"]
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        return {str(piece[0]): i for i, piece in enumerate(vocab)}
    return {str(t): int(i) for t, i in vocab.items()}  # BPE, WordPiece, WordLevel


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
    size = config.get("vocab_size", (text or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def tokenizer_donor(source: str, models: tuple[str, ...], base: str, checkpoints: Mapping[str, Checkpoint],
                    where: str) -> str:
    """The source whose tokenizer files the output takes for ``tokenizer_source`` (``base``,
    ``union`` or a source name), after checking that mergekit would leave the embeddings as they
    are: every one of ``models`` has the vocabulary of ``base`` and it numbers all their rows.

    Raises:
        PlanError: the vocabularies differ, or do not number every embedding row (one line).
    """
    what = f"{where}: tokenizer_source {source!r}"
    reference = vocabulary(checkpoints[base], base)
    digest = _digest(checkpoints[base])
    for name in dict.fromkeys(models):
        # Fine-tunes usually ship the base's tokenizer.json as it is: the same bytes are the same
        # vocabulary, and parsing one costs several times its size in memory.
        same = name == base or (_digest(checkpoints[name]) == digest
                                and _vocab_size(checkpoints[name].config) == _vocab_size(checkpoints[base].config))
        vocab = reference if same else vocabulary(checkpoints[name], name)
        if vocab != reference:
            extra = sorted(vocab.keys() - reference.keys())
            moved = sorted(t for t in vocab.keys() & reference.keys() if vocab[t] != reference[t])
            how = (f"{len(extra)} token(s) {base!r} lacks, e.g. {extra[0]!r}" if extra else
                   f"{len(moved)} token(s) at other ids, e.g. {moved[0]!r}" if moved else
                   f"{len(reference) - len(vocab)} fewer token(s)")
            raise PlanError(f"{what}: {name!r} has another vocabulary than {base!r} ({how}); mergekit re-assembles "
                            f"the embedding rows for it, which is not built yet: merge models of one vocabulary, "
                            f"or use mergekit")
        size = _vocab_size(checkpoints[name].config)
        if size is not None and (len(vocab) != size or set(vocab.values()) != set(range(size))):
            raise PlanError(f"{what}: {name!r} has {size} embedding rows but its tokenizer numbers {len(vocab)} "
                            f"of them; mergekit trims the embeddings to the tokenizer's tokens, which is not built "
                            f"yet: remove tokenizer_source to keep every row")
    return base if source in ("base", "union") else source


def copied_files(base: Checkpoint, donor: Checkpoint) -> list[tuple[Checkpoint, str]]:
    """The small files an output takes, with their checkpoint: the tokenizer's from ``donor``,
    every other from ``base``."""
    if donor is base:
        return [(base, f) for f in base.extra_files]
    return [(base, f) for f in base.extra_files if not TOKENIZER_FILES.fullmatch(f)] + \
        [(donor, f) for f in donor.extra_files if TOKENIZER_FILES.fullmatch(f)]
