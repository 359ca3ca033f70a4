"""``--link`` across filesystems (issue 16): a reflink or a hard link cannot leave its filesystem,
so a shard planned as a link to a source on another filesystem is copied. ``plan`` said "disk
needed: 0 B" and ``apply`` then ran out of space; now both count those shards as written, and say
so in one line."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import tensorsurgery as ts
from cli_helpers import run, snapshot
from tensorsurgery.output import writer
from tensorsurgery.output.linking import CopiedLinks, copied_links, find_copied_links
from tensorsurgery.units import format_bytes

SOLAR = Path(__file__).resolve().parent.parent / "manifests" / "solar-dus.toml"


def _plan(source: Path, output: Path):
    plan = ts.plan(SOLAR, sources=source, output=output, link=True)
    assert any(s.link is not None for s in plan.shards), "the fixture should have a shard DUS leaves in place"
    return plan


def test_copied_links_counts_shards_on_other_devices(tiny_mistral, tmp_path):
    plan = _plan(tiny_mistral, tmp_path / "out")
    linked = [s for s in plan.shards if s.link is not None]
    same = {s.link: 7 for s in linked}
    assert copied_links(plan, same, 7) == ()
    other = {s.link: 8 for s in linked}
    assert copied_links(plan, other, 7) == (
        CopiedLinks(tiny_mistral, tuple(s.filename for s in linked), sum(s.nbytes for s in linked)),)
    # A file that cannot be looked at is left out (apply reports it when it reads it).
    assert copied_links(plan, {}, 7) == ()
    # Only the shards on the other device are counted.
    first = linked[0]
    mixed = {**same, first.link: 9}
    assert copied_links(plan, mixed, 7) == (CopiedLinks(tiny_mistral, (first.filename,), first.nbytes),)
    assert copied_links(plan, mixed, 7)[0].note == (
        f"links are not possible from {tiny_mistral} (another filesystem): {format_bytes(first.nbytes)} copied")


@pytest.fixture
def shm_source(tiny_mistral):
    """A copy of the tiny checkpoint on /dev/shm (tmpfs), another filesystem than tmp_path's."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ts-link-"))
    try:
        source = folder / "src"
        shutil.copytree(tiny_mistral, source)
        yield source
    finally:
        shutil.rmtree(folder)


def test_link_across_filesystems(capsys, shm_source, tmp_path):
    if os.stat(shm_source).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and tmp_path are one filesystem here")
    out = tmp_path / "out"
    plan = _plan(shm_source, out)
    copied = find_copied_links(plan)
    need = sum(s.nbytes for s in plan.shards)
    assert [c.nbytes for c in copied] == [need - plan.written_nbytes]
    line = f"links are not possible from {shm_source} (another filesystem): {format_bytes(copied[0].nbytes)} copied"

    code, text, _ = run(capsys, "plan", SOLAR, "--source", shm_source, "--output", out, "--link")
    assert code == 0 and line in text.splitlines()
    assert f"disk needed: {format_bytes(need)}" in text  # was 0 B short of the linked shards
    code, text, _ = run(capsys, "plan", SOLAR, "--source", shm_source, "--output", out, "--link", "--json")
    data = json.loads(text)
    assert data["disk_needed"] == need and data["links_copied"][0]["nbytes"] == copied[0].nbytes

    code, text, err = run(capsys, "apply", SOLAR, "--source", shm_source, "--output", out, "--link", "--no-progress")
    assert code == 0, err
    assert f"note: {line}" in err.splitlines()
    assert f"{format_bytes(need)} of shard files written" in text
    for shard in plan.shards:
        assert os.stat(out / shard.filename).st_dev == os.stat(out).st_dev
    assert run(capsys, "verify", out)[0] == 0


def test_apply_checks_free_space_for_copied_links(capsys, shm_source, tmp_path, monkeypatch):
    """The free-space check counts the shards that will be copied: with room for the written shards
    alone, apply refuses before writing instead of filling the disk."""
    if os.stat(shm_source).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and tmp_path are one filesystem here")
    out = tmp_path / "out"
    plan = _plan(shm_source, out)
    real = shutil.disk_usage
    free = plan.written_nbytes + (16 << 20) + 1  # enough for what main counted (linked shards excluded)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "apply", SOLAR, "--source", shm_source, "--output", out, "--link", "--no-progress")
    assert code == 2 and "not enough free disk space" in err and f"needs {sum(s.nbytes for s in plan.shards):,}" in err
    assert snapshot(tmp_path) == before
