"""The public functions stay functions: importing a submodule must never rebind a name of the
package's API (a submodule called ``verify`` made ``ts.verify`` a module after its first call)."""
from __future__ import annotations

import importlib
import pkgutil
import types

import tensorsurgery as ts
from tensorsurgery import api


def _import_every_submodule() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(ts.__path__, "tensorsurgery.")
             if m.name != "tensorsurgery.__main__"]
    for name in names:
        importlib.import_module(name)
    return names


def test_no_submodule_is_named_like_a_public_name():
    submodules = {name.rsplit(".", 1)[1] for name in _import_every_submodule()}
    assert not submodules & set(ts.__all__), "a submodule shadows a public name"
    for name in ts.__all__:
        value = getattr(ts, name)
        assert not isinstance(value, types.ModuleType), name
        if hasattr(api, name):
            assert value is getattr(api, name), name


def test_every_command_twice_in_any_order(tiny_mistral, tmp_path):
    manifest = tmp_path / "m.toml"
    manifest.write_text('[source]\nmodel = "src"\n[layers]\nplan = "dus"\noverlap = 2\n'
                        '[output]\npath = "out"\n')
    sources = {"": str(tiny_mistral)}
    for round_ in range(2):
        out = tmp_path / f"out{round_}"
        assert ts.inspect(tiny_mistral).config
        assert ts.plan(manifest, sources=sources).tensors
        ts.apply(manifest, sources=sources, output=out)
        assert ts.verify(out).ok
        assert ts.verify(manifest, out, sources=sources).ok
        assert ts.load(manifest, sources=sources).layers.plan == "dus"
        assert isinstance(ts.resolve(ts.load(manifest, sources=sources)), dict)
        _import_every_submodule()
