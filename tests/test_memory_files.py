"""Peak memory stays flat for every file an output holds, not only shards (issue 9): a 700 MB
extra file in a source took ``apply`` and ``verify`` to 750 MB because copied files were hashed
by reading them whole. Here a 150 MB ``tokenizer.model`` (sparse, so it costs no disk to make)
goes through apply, verify against the manifest, and verify from the record with and without the
sources; each child's own peak RSS (VmHWM) must stay under the bound test_memory.py uses."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import peak_rss_mb, write_manifest

RSS_BOUND_MB = 100
EXTRA_MB = 150

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status")
def test_a_large_copied_file_keeps_memory_flat(tiny_mistral, tmp_path):
    src = shutil.copytree(tiny_mistral, tmp_path / "src")
    with open(src / "tokenizer.model", "wb") as f:
        f.truncate(EXTRA_MB << 20)
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path, src, out)
    peaks = {"apply": peak_rss_mb(tmp_path, "apply", manifest, "--no-progress")}
    assert (out / "tokenizer.model").stat().st_size == EXTRA_MB << 20
    peaks["verify MANIFEST"] = peak_rss_mb(tmp_path, "verify", manifest)
    peaks["verify OUTPUT (record+sources)"] = peak_rss_mb(tmp_path, "verify", out)
    src.rename(tmp_path / "moved")  # the record's source is gone: the record alone is checked
    peaks["verify OUTPUT (record)"] = peak_rss_mb(tmp_path, "verify", out)
    over = {k: round(v) for k, v in peaks.items() if v >= RSS_BOUND_MB}
    assert not over, f"peak RSS over {RSS_BOUND_MB} MB: {over} (all: {peaks})"
