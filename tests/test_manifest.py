"""Tests for tensorsurgery.manifest.toml: the seed manifests, every error path (one line naming the
file and the key path), sizes, and the --source / --output overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from tensorsurgery.errors import ManifestError
from tensorsurgery.families.rules import RenameRule, RenameSpec
from tensorsurgery.manifest.loading import load_manifest
from tensorsurgery.manifest.toml import (
    DEFAULT_MAX_SHARD_SIZE,
    LayersSpec,
    OutputSpec,
    Segment,
    SourceSpec,
    apply_overrides,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"

BASE = '[source]\nmodel = "mistralai/Mistral-7B-v0.1"\n\n[output]\npath = "out/x"\n'
TWO_SOURCES = ('[sources.a]\nmodel = "org/a"\nrevision = "v1"\n\n[sources.b]\nmodel = "org/b"\n\n'
               '[output]\npath = "out/ab"\n')


def manifest_error(tmp_path: Path, text: str, **overrides) -> tuple[Path, str]:
    """Write ``text`` as a manifest, load it, and return its path and the ManifestError text."""
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, **overrides)
    message = str(excinfo.value)
    assert "\n" not in message
    return path, message


def load(tmp_path: Path, text: str, **overrides):
    path = tmp_path / "good.toml"
    path.write_text(text, encoding="utf-8")
    return load_manifest(path, **overrides)


# --- the seed manifests ---------------------------------------------------------------------------

SEEDS = {
    "llama2-init-mistral": (LayersSpec("keep"), "out/llama2-init-mistral"),
    "solar-dus": (LayersSpec("dus", overlap=8), "out/solar-10.7b-dus"),
    "idus-1layer": (LayersSpec("idus", overlap=8, group=1), "out/solar-10.7b-idus-1layer"),
    "idus-8layer": (LayersSpec("idus", overlap=8, group=8), "out/solar-10.7b-idus-8layer"),
}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_manifest(name):
    path = MANIFESTS / f"{name}.toml"
    m = load_manifest(path)
    layers, output = SEEDS[name]
    assert m.path == path and m.text == path.read_text(encoding="utf-8")
    assert m.sources == (SourceSpec("source", "mistralai/Mistral-7B-v0.1", "main"),)
    assert m.rename == RenameSpec(preset="mistral-to-llama")
    assert m.layers == layers
    assert dict(m.config) == {}
    assert m.output == OutputSpec(path=output, dtype=None, max_shard_size=5_000_000_000)


def test_every_manifest_in_the_folder_parses():
    paths = sorted(MANIFESTS.glob("*.toml"))
    assert {p.stem for p in paths} >= set(SEEDS) | {"demo"}
    for p in paths:
        assert load_manifest(p).sources


def test_demo_manifest():
    m = load_manifest(MANIFESTS / "demo.toml")
    assert m.sources == (SourceSpec("source", "examples/tiny-mistral", None),)
    assert m.layers == LayersSpec("dus", overlap=8)
    assert m.output.path == "out/demo-dus"


def test_full_manifest(tmp_path):
    m = load(tmp_path, TWO_SOURCES + '''
[rename]
preset = "mistral-to-llama"
rules = [{ match = 'mlp\\.', replace = 'ffn.' }, { match = '^lm_head', replace = 'output' }]
drop = ['rotary_emb', '^extra\\.']

[layers]
plan = "explicit"
arrangement = [[0, 24], 30, { source = "b", layers = [8, 32] }, { source = "a", layers = 3 }]

[config]
max_position_embeddings = 4096
rope_scaling = { type = "linear", factor = 2.0 }
''')
    assert m.sources == (SourceSpec("a", "org/a", "v1"), SourceSpec("b", "org/b", None))
    assert m.rename == RenameSpec("mistral-to-llama",
                                  (RenameRule(r"mlp\.", "ffn."), RenameRule("^lm_head", "output")),
                                  ("rotary_emb", r"^extra\."))
    assert m.layers == LayersSpec("explicit", arrangement=(
        Segment(None, 0, 24), Segment(None, 30, 31), Segment("b", 8, 32), Segment("a", 3, 4)))
    assert dict(m.config) == {"max_position_embeddings": 4096,
                              "rope_scaling": {"type": "linear", "factor": 2.0}}


def test_defaults(tmp_path):
    m = load(tmp_path, BASE)
    assert m.rename == RenameSpec()
    assert m.layers == LayersSpec("keep")
    assert m.output == OutputSpec("out/x", None, DEFAULT_MAX_SHARD_SIZE)


def test_output_options(tmp_path):
    m = load(tmp_path, BASE + 'dtype = "float16"\nmax_shard_size = "2GiB"\n')
    assert m.output == OutputSpec("out/x", "float16", 2 * 2**30)
    m = load(tmp_path, BASE + "max_shard_size = 1000\n")
    assert m.output.max_shard_size == 1000


# --- error messages: the whole text -----------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[extra]\na = 1\n")
    assert msg == (f"{path}: extra: unknown key; expected one of: source, sources, rename, layers, "
                   f"config, output, merge")


def test_unknown_key_in_layers(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "keep"\noverlaps = 8\n')
    assert msg == f"{path}: layers.overlaps: unknown key; expected one of: plan, overlap, group, arrangement"


def test_unknown_key_in_source(tmp_path):
    path, msg = manifest_error(tmp_path, BASE.replace("[output]", 'rev = "main"\n[output]'))
    assert msg == f"{path}: source.rev: unknown key; expected one of: model, revision, adapter, adapter_revision"


def test_unknown_key_in_output(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "shard_size = 5\n")
    assert msg == (f"{path}: output.shard_size: unknown key; expected one of: path, dtype, max_shard_size, "
                   f"push_to_hub, private")


@pytest.mark.parametrize("value, found", [('"8"', "a string '8'"), ("true", "a boolean True"),
                                          ("8.0", "float 8.0"), ("[8]", "an array [8]")])
def test_overlap_wrong_type(tmp_path, value, found):
    path, msg = manifest_error(tmp_path, BASE + f'[layers]\nplan = "dus"\noverlap = {value}\n')
    assert msg == f"{path}: layers.overlap: expected an integer, found {found}"


def test_group_wrong_type(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "idus"\noverlap = 8\ngroup = false\n')
    assert msg == f"{path}: layers.group: expected an integer, found a boolean False"


def test_plan_wrong_type(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[layers]\nplan = 1\n")
    assert msg == f"{path}: layers.plan: expected a string, found an integer 1"


def test_plan_unknown(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "stack"\n')
    assert msg == f"{path}: layers.plan: unknown plan 'stack'; expected one of: keep, dus, idus, explicit"


def test_dus_without_overlap(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "dus"\n')
    assert msg == f"{path}: layers.overlap: missing; plan 'dus' needs it"


def test_idus_without_group(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "idus"\noverlap = 8\n')
    assert msg == f"{path}: layers.group: missing; plan 'idus' needs it"


def test_group_given_for_dus(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "dus"\noverlap = 8\ngroup = 8\n')
    assert msg == f"{path}: layers.group: does not apply to plan 'dus'"


@pytest.mark.parametrize("extra, key", [("overlap = 8", "overlap"), ("arrangement = [0]", "arrangement")])
def test_option_given_for_keep(tmp_path, extra, key):
    path, msg = manifest_error(tmp_path, BASE + f'[layers]\nplan = "keep"\n{extra}\n')
    assert msg == f"{path}: layers.{key}: does not apply to plan 'keep'"


def test_negative_overlap_and_zero_group(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "dus"\noverlap = -1\n')
    assert msg == f"{path}: layers.overlap: must be >= 0, found -1"
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "idus"\noverlap = 8\ngroup = 0\n')
    assert msg == f"{path}: layers.group: must be >= 1, found 0"


def test_explicit_without_arrangement(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "explicit"\n')
    assert msg == f"{path}: layers.arrangement: missing; plan 'explicit' needs it"


def test_empty_arrangement(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[layers]\nplan = "explicit"\narrangement = []\n')
    assert msg == f"{path}: layers.arrangement: is empty; list layer ranges such as [0, 24] or indices"


@pytest.mark.parametrize("item, shown", [
    ("[24, 8]", "[24, 8]"), ("[3, 3]", "[3, 3]"), ("[0, 1, 2]", "[0, 1, 2]"), ("[0]", "[0]"),
    ("-1", "-1"), ('"8"', "'8'"), ("true", "True"), ("[0, 2.5]", "[0, 2.5]"), ("[-1, 4]", "[-1, 4]"),
    ("[true, 4]", "[True, 4]"),
])
def test_bad_arrangement_item(tmp_path, item, shown):
    path, msg = manifest_error(tmp_path, BASE + f'[layers]\nplan = "explicit"\narrangement = [[0, 24], 25, {item}]\n')
    assert msg == (f"{path}: layers.arrangement[2]: expected a layer index or a half-open range "
                   f"[start, stop] with 0 <= start < stop, found {shown}")


def test_bad_layers_in_a_source_item(tmp_path):
    path, msg = manifest_error(tmp_path, TWO_SOURCES + '[layers]\nplan = "explicit"\n'
                               'arrangement = [{ source = "b", layers = [4, 2] }]\n')
    assert msg == (f"{path}: layers.arrangement[0]: expected a layer index or a half-open range "
                   f"[start, stop] with 0 <= start < stop, found [4, 2]")


def test_unknown_source_in_arrangement(tmp_path):
    path, msg = manifest_error(tmp_path, TWO_SOURCES + '[layers]\nplan = "explicit"\narrangement = '
                               '[{ source = "a", layers = [0, 4] }, { source = "c", layers = [0, 4] }]\n')
    assert msg == f"{path}: layers.arrangement[1].source: unknown source 'c'; sources are: a, b"


def test_arrangement_item_keys(tmp_path):
    path, msg = manifest_error(tmp_path, TWO_SOURCES + '[layers]\nplan = "explicit"\n'
                               'arrangement = [{ source = "a", layer = [0, 4] }]\n')
    assert msg == f"{path}: layers.arrangement[0].layer: unknown key; expected one of: source, layers"
    path, msg = manifest_error(tmp_path, TWO_SOURCES + '[layers]\nplan = "explicit"\n'
                               'arrangement = [0, { layers = [0, 4] }]\n')
    assert msg == f"{path}: layers.arrangement[1].source: missing; it is required"


def test_bad_regex_in_rules(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[rename]\nrules = [{ match = 'a', replace = 'b' }, "
                               "{ match = 'layers\\.(\\d+', replace = 'x' }]\n")
    assert msg == (f"{path}: rename.rules[1].match: invalid regular expression 'layers\\\\.(\\\\d+': "
                   f"missing ), unterminated subpattern at position 8")


def test_bad_regex_in_drop(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[rename]\ndrop = ['ok', '[']\n")
    assert msg == (f"{path}: rename.drop[1]: invalid regular expression '[': unterminated character "
                   f"set at position 0")


def test_bad_rule_shapes(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[rename]\nrules = ['x']\n")
    assert msg == (f"{path}: rename.rules[0]: expected a table {{ match = '...', replace = '...' }}, "
                   f"found a string 'x'")
    path, msg = manifest_error(tmp_path, BASE + "[rename]\nrules = [{ match = 'a' }]\n")
    assert msg == f"{path}: rename.rules[0].replace: missing; it is required"
    path, msg = manifest_error(tmp_path, BASE + "[rename]\nrules = [{ match = 'a', replace = 'b', flags = 'i' }]\n")
    assert msg == f"{path}: rename.rules[0].flags: unknown key; expected one of: match, replace"
    path, msg = manifest_error(tmp_path, BASE + "[rename]\ndrop = [1]\n")
    assert msg == f"{path}: rename.drop[0]: expected a string, found an integer 1"


def test_bad_dtype(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + 'dtype = "int8"\n')
    assert msg == f"{path}: output.dtype: unsupported dtype 'int8'; expected one of: float16, bfloat16, float32"


@pytest.mark.parametrize("value, reason", [
    ('"5 parsecs"', "expected a size such as \"5GB\" or \"500MB\", found '5 parsecs'"),
    ('""', "expected a size such as \"5GB\" or \"500MB\", found ''"),
    ('"-5GB"', "expected a size such as \"5GB\" or \"500MB\", found '-5GB'"),
    ("0", "size must be positive, found 0"),
    ("-1", "size must be positive, found -1"),
    ('"0GB"', "size must be positive, found '0GB'"),
    ("true", "expected an integer or a string, found a boolean True"),
    ("1.5", "expected an integer or a string, found float 1.5"),
])
def test_bad_max_shard_size(tmp_path, value, reason):
    path, msg = manifest_error(tmp_path, BASE + f"max_shard_size = {value}\n")
    assert msg == f"{path}: output.max_shard_size: {reason}"


def test_missing_output_path(tmp_path):
    path, msg = manifest_error(tmp_path, '[source]\nmodel = "m"\n[output]\ndtype = "float16"\n')
    assert msg == f"{path}: output.path: missing; it is required"


def test_missing_output_table(tmp_path):
    path, msg = manifest_error(tmp_path, '[source]\nmodel = "m"\n')
    assert msg == f"{path}: output: missing; it is required"


def test_both_source_and_sources(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + '[sources.a]\nmodel = "x"\n')
    assert msg == f"{path}: give exactly one of [source] or [sources.NAME] tables"


def test_no_source(tmp_path):
    path, msg = manifest_error(tmp_path, '[output]\npath = "o"\n')
    assert msg == f"{path}: give exactly one of [source] or [sources.NAME] tables"


def test_source_problems(tmp_path):
    path, msg = manifest_error(tmp_path, '[source]\nmodel = "  "\n[output]\npath = "o"\n')
    assert msg == f"{path}: source.model: is empty; give a local folder or a Hugging Face repo id"
    path, msg = manifest_error(tmp_path, '[source]\nrevision = "main"\n[output]\npath = "o"\n')
    assert msg == f"{path}: source.model: missing; it is required"
    path, msg = manifest_error(tmp_path, '[sources]\n[output]\npath = "o"\n')
    assert msg == f"{path}: sources: no sources; add a [sources.NAME] table with a model"
    path, msg = manifest_error(tmp_path, 'source = "m"\n[output]\npath = "o"\n')
    assert msg == f"{path}: source: expected a table, found a string 'm'"


def test_config_must_be_a_table(tmp_path):
    path, msg = manifest_error(tmp_path, 'config = 3\n' + BASE)
    assert msg == f"{path}: config: expected a table, found an integer 3"


def test_not_toml(tmp_path):
    path, msg = manifest_error(tmp_path, BASE + "[layers\nplan = 'keep'\n")
    assert msg == f"{path}: not valid TOML: Expected ']' at the end of a table declaration (at line 6, column 8)"


def test_unreadable_manifest(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path)
    assert str(excinfo.value) == (f"{path}: cannot read the manifest: [Errno 2] No such file or "
                                  f"directory: '{path}'")


# --- sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, size", [
    ("5GB", 5_000_000_000), ("5gb", 5_000_000_000), (" 5 GB ", 5_000_000_000), ("500MB", 500_000_000),
    ("40KB", 40_000), ("1TB", 10**12), ("2GiB", 2 * 2**30), ("3MiB", 3 * 2**20), ("1KiB", 1024),
    ("1TiB", 2**40), ("123", 123), ("123B", 123), ("1.5GB", 1_500_000_000), ("0.5KiB", 512),
    # exact decimal arithmetic (float would truncate 2.01 * 10**6 to 2009999)
    ("2.01MB", 2_010_000), ("4.35GB", 4_350_000_000), ("2.03KB", 2030),
    (1, 1), (5_000_000_000, 5_000_000_000),
])
def test_parse_size(value, size):
    assert parse_size(value) == size
    assert type(parse_size(value)) is int


@pytest.mark.parametrize("value, message", [
    ("5XB", "expected a size such as \"5GB\" or \"500MB\", found '5XB'"),
    ("GB", "expected a size such as \"5GB\" or \"500MB\", found 'GB'"),
    ("1e9", "expected a size such as \"5GB\" or \"500MB\", found '1e9'"),
    ("0.1B", "size must be positive, found '0.1B'"),
    (0, "size must be positive, found 0"),
    (True, "expected a size such as \"5GB\", found True"),
])
def test_parse_size_rejects(value, message):
    with pytest.raises(ValueError) as excinfo:
        parse_size(value)
    assert str(excinfo.value) == message


# --- --source / --output -----------------------------------------------------------------------------

def test_bare_source_override(tmp_path):
    m = load(tmp_path, BASE.replace('[output]', 'revision = "main"\n[output]'),
             sources={"": "/data/mistral"}, output="/data/out")
    assert m.sources == (SourceSpec("source", "/data/mistral", None),)
    assert m.output == OutputSpec("/data/out", None, DEFAULT_MAX_SHARD_SIZE)


def test_named_source_override(tmp_path):
    m = load(tmp_path, TWO_SOURCES, sources={"b": "/data/b"})
    assert m.sources == (SourceSpec("a", "org/a", "v1"), SourceSpec("b", "/data/b", None))
    assert m.output.path == "out/ab"
    m = load(tmp_path, BASE, sources={"source": "/data/m"})
    assert m.sources == (SourceSpec("source", "/data/m", None),)


def test_ambiguous_bare_override(tmp_path):
    path, msg = manifest_error(tmp_path, TWO_SOURCES, sources={"": "/data/x"})
    assert msg == f'{path}: sources=PATH is ambiguous with 2 sources; use sources={{"NAME": PATH}}'


def test_override_of_unknown_source(tmp_path):
    path, msg = manifest_error(tmp_path, TWO_SOURCES, sources={"c": "/data/x"})
    assert msg == f'{path}: sources={{"c": ...}}: no source called \'c\'; sources are: a, b'


def test_apply_overrides_is_pure(tmp_path):
    m = load(tmp_path, TWO_SOURCES)
    new = apply_overrides(m, {"a": "/x"}, "/y")
    assert m.sources[0].model == "org/a" and m.output.path == "out/ab"
    assert new.sources[0] == SourceSpec("a", "/x", None) and new.output.path == "/y"
    assert apply_overrides(m, {}, None) == m


# --- [merge] with what a merge does not take ------------------------------------------------------

_MERGE = '[merge]\nmethod = "linear"\n[merge.models.a]\nweight = 1\n[merge.models.b]\nweight = 1\n' \
         '[output]\npath = "out/m"\n'


@pytest.mark.parametrize("extra, expected", [
    ('[layers]\nplan = "dus"\noverlap = 8\n',
     "layers.plan: 'dus' with [merge]: a merge keeps the layers as they are; to merge parts of models, give "
     "[[merge.slices]]"),
])
def test_merge_refusals_name_the_key(tmp_path, extra, expected):
    path, message = manifest_error(tmp_path, f'[sources.a]\nmodel = "./a"\n[sources.b]\nmodel = "./b"\n{extra}{_MERGE}')
    assert message == f"{path}: {expected}", message
