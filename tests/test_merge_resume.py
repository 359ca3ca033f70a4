"""A merge killed part-way and finished with ``apply --resume`` is byte for byte the merge run
once (issue 19: "our bytes never depend on --resume").

The two-pass methods (slerp's norms, ties' thresholds) compute each tensor's statistics afresh in
the resumed process, and DARE's draws start where the tensor's place in the random stream says:
the resumed run keeps the finished shards that verify and must make the rest exactly as the
uninterrupted run did. The models are synthetic Mistrals of ~40 MB (normal values, three seeds),
in 6 MB output shards, so that a SIGKILL lands between shards (test_faults' harness).
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from test_faults import SHARD, fingerprint, interrupted_apply, tensorsurgery

from synthetic import Dims, make_mistral

#: 2 layers of 13 MB and 6 MB of embeddings and lm_head each in bf16: 38 MB a model.
DIMS = Dims(vocab=3000, hidden=1024, intermediate=2816, heads=16, kv_heads=4, head_dim=64, layers=2)

#: (method, what its [merge] table and models say beyond the method).
METHODS = {
    "slerp": ('base = "base"\n[merge.parameters]\nt = [0.1, 0.7, 0.4]\n', ("ft0",)),
    "ties": ('base = "base"\n[merge.parameters]\ndensity = 0.3\nweight = 0.5\n', ("ft0", "ft1")),
    "dare_ties": ('base = "base"\nseed = 7\n[merge.parameters]\ndensity = 0.6\nweight = 0.5\n',
                  ("ft0", "ft1")),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-resume")
    return {name: make_mistral(root / name, DIMS, seed=seed, max_shard_size=20_000_000, tokenizer=False)
            for seed, name in enumerate(("base", "ft0", "ft1"))}


def _manifest(folder: Path, family: dict[str, Path], method: str, out: Path) -> Path:
    table, models = METHODS[method]
    sources = "".join(f'[sources.{name}]\nmodel = "{family[name]}"\n' for name in ("base", *models))
    manifest = folder / f"{out.name}.toml"
    tables = "".join(f"[merge.models.{name}]\n" for name in models)
    manifest.write_text(f'{sources}\n[merge]\nmethod = "{method}"\n{table}{tables}\n'
                        f'[output]\npath = "{out}"\nmax_shard_size = "6MB"\n', encoding="utf-8")
    return manifest


@pytest.mark.parametrize("method", METHODS)
def test_killed_merge_resumes_to_the_same_bytes(tmp_path, family, method):
    whole = tmp_path / "whole"
    r = tensorsurgery("apply", _manifest(tmp_path, family, method, whole), "--no-progress")
    assert r.returncode == 0, r.stderr
    expected = {name: digest for name, (digest, _, _) in fingerprint(whole).items()}
    total = sum(1 for name in expected if SHARD.fullmatch(name))
    assert total >= 4

    out = tmp_path / "resumed"
    manifest = _manifest(tmp_path, family, method, out)
    tmp = tmp_path / ".resumed.tensorsurgery-tmp"
    code, _, left = interrupted_apply(manifest, out, tmp, signal.SIGKILL, wait_for_finished=True)
    assert code == -signal.SIGKILL and not out.exists()
    done = [name for name in left if SHARD.fullmatch(name)]
    assert 1 <= len(done) < total

    r = tensorsurgery("apply", manifest, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"--resume: kept {len(done)} of {total} shard(s)" in r.stderr
    got = {name: digest for name, (digest, _, _) in fingerprint(out).items()}
    # The record and card name the output folder; every other file is the uninterrupted run's.
    differing = sorted(name for name in expected.keys() | got.keys() if expected.get(name) != got.get(name))
    assert differing == [] or set(differing) <= {"tensorsurgery.json", "README.md"}, differing
    assert all(got[name] == expected[name] for name in expected if SHARD.fullmatch(name))
    v = tensorsurgery("verify", out, "--no-progress")
    assert v.returncode == 0 and "every byte matches" in v.stdout, v.stdout + v.stderr
