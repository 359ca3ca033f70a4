"""Peak memory of `apply` and `verify` stays bounded whatever the tensor sizes.

Not a timing: a regression that reads a whole tensor (here 128 MB) into memory, or grows a
buffer per tensor, pushes the child's peak RSS past the bound and fails."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import peak_rss_mb
from synthetic import Dims, make_mistral

#: Python + numpy + tensorsurgery is ~35 MB and the buffers 16 MB; a whole tensor is 128 MB.
RSS_BOUND_MB = 100
BIG_TENSOR_MB = 128


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    # vocab x hidden bf16 = 128 MB embeddings (and as much lm_head), two small layers.
    hidden = 2048
    vocab = BIG_TENSOR_MB * 2**20 // (2 * hidden)
    dims = Dims(vocab=vocab, hidden=hidden, intermediate=256, heads=16, kv_heads=4, head_dim=128, layers=4)
    return make_mistral(tmp_path_factory.mktemp("big") / "src", dims, values="bytes", max_shard_size=200_000_000)


@pytest.mark.parametrize("cast", [None, "float32"])
def test_apply_and_verify_peak_rss_is_bounded(big_checkpoint, tmp_path, cast):
    manifest = tmp_path / "m.toml"
    dtype = f'dtype = "{cast}"\n' if cast else ""
    manifest.write_text(f'[source]\nmodel = "{big_checkpoint}"\n[rename]\npreset = "mistral-to-llama"\n'
                        f'[layers]\nplan = "dus"\noverlap = 1\n[output]\npath = "{tmp_path / "out"}"\n{dtype}')
    apply_rss = peak_rss_mb(tmp_path, "apply", manifest)
    verify_rss = peak_rss_mb(tmp_path, "verify", manifest)
    assert (tmp_path / "out" / "config.json").is_file()
    assert apply_rss < RSS_BOUND_MB, f"apply peaked at {apply_rss:.0f} MB"
    assert verify_rss < RSS_BOUND_MB, f"verify peaked at {verify_rss:.0f} MB"
