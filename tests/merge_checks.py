"""The checks every merge method's tests make (tests/test_merge_*.py), one definition each: the
tiny model family, mergekit on one torch thread, a config applied through either front door, the
bytes against mergekit's and verify, the same bytes on 1 and 3 threads with a flipped byte found
in both verify modes, and a kernel's inputs written to a file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from test_merges import (
    FINE_TUNES,
    _family,
    _raw,
    _yaml,
    assert_bitwise_equal,
    config_differences,
    mergekit,
    read_all,
    toml_manifest,
)

from cli_helpers import differences, run
from tensorsurgery.io.byte_source import LocalFile

#: torch dtypes as safetensors codes.
CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def family_fixture(names: tuple[str, ...] = FINE_TUNES) -> Callable[..., dict[str, Path]]:
    """A module-scoped ``models`` fixture: the tiny base and its fine-tunes ``names``."""
    @pytest.fixture(scope="module")
    def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        return _family(tmp_path_factory.mktemp("models"), names)

    return models


def single_thread_mergekit(config: dict[str, Any], out: Path) -> Path:
    """mergekit's output of ``config`` with torch on one thread (its sums then deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mergekit(config, out)
    finally:
        torch.set_num_threads(threads)


def apply_door(capsys: Any, tmp_path: Path, config: dict[str, Any], door: str = "yaml",
               name: str = "m") -> tuple[Path, Path]:
    """``config`` written as mergekit's YAML or our TOML (``door``) and applied: (manifest, output)."""
    ours = tmp_path / "ours"
    manifest = tmp_path / f"{name}.{'yml' if door == 'yaml' else 'toml'}"
    manifest.write_text(yaml.safe_dump(config, sort_keys=False) if door == "yaml" else toml_manifest(config, ours))
    code, out, err = run(capsys, "apply", manifest, "--output", ours, "--no-progress")
    assert code == 0, out + err
    return manifest, ours


def equals_mergekit(capsys: Any, tmp_path: Path, config: dict[str, Any], door: str, theirs: Path,
                    name: str = "m") -> None:
    """Our output of ``config`` through ``door`` is mergekit's (``theirs``) bitwise, config.json
    too, and verifies."""
    manifest, ours = apply_door(capsys, tmp_path, config, door, name)
    assert_bitwise_equal(read_all(theirs), read_all(ours))
    assert config_differences(theirs, ours) == {}
    code, out, err = run(capsys, "verify", manifest, ours, "--no-progress")
    assert code == 0 and "every byte matches" in out, out + err


def same_bytes_on_threads(capsys: Any, tmp_path: Path, manifest: Path) -> Path:
    """``manifest`` applied on 1 and 3 threads gives the same bytes; returns the 3-thread output."""
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        assert run(capsys, "apply", manifest, "--output", out, "--threads", threads, "--no-progress")[0] == 0
        outputs.append(read_all(out))
    assert_bitwise_equal(*outputs)
    return tmp_path / "t3"


def flipped_byte_found(capsys: Any, manifest: Path, output: Path, label: str) -> None:
    """One byte of ``output``'s shard changed: verify finds that one tensor, made by ``label``,
    with the manifest and from the record alone."""
    shard = output / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3000] ^= 4
    shard.write_bytes(bytes(data))
    for argv in (("verify", manifest, output), ("verify", output)):
        found = differences(*run(capsys, *argv, "--no-progress"))
        assert len(found) == 1 and f"(transform: {label}" in found[0], found


def threads_and_verify(capsys: Any, tmp_path: Path, config: dict[str, Any], label: str) -> None:
    """The same bytes on 1 and 3 threads; verify catches one changed byte in both modes."""
    manifest = _yaml(tmp_path, config)
    flipped_byte_found(capsys, manifest, same_bytes_on_threads(capsys, tmp_path, manifest), label)


def file_inputs(tmp_path: Path, tensors: list[torch.Tensor]) -> tuple[Path, tuple[Any, ...]]:
    """``tensors`` (of one dtype and size) written one after another to a file, as recipe inputs."""
    from tensorsurgery.ops.base import ByteRange, Input

    path = tmp_path / "x.bin"
    path.write_bytes(b"".join(_raw(x).tobytes() for x in tensors))
    n, code = tensors[0].numel(), CODES[tensors[0].dtype]
    size = tensors[0].element_size() * n
    file = LocalFile(path)
    return path, tuple(Input("s", "k", code, (n,), ByteRange(file, i * size, size)) for i in range(len(tensors)))


def prepared_op(op: Any, path: Path, inputs: tuple[Any, ...]) -> Any:
    """A two-pass ``op`` on ``inputs`` (in ``path``) after its statistics pass."""
    from tensorsurgery.ops.interpreter import Prepared, prepared

    reader = LocalFile(path).open()
    try:
        return prepared(Prepared(inputs[0].dtype, inputs[0].range.length, inputs, op), [reader] * len(inputs))
    finally:
        reader.close()
