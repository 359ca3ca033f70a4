"""The public Python API: what the command line does, for notebooks, CI scripts and other tools.

Each function takes a manifest as a path, as text (TOML, or a mergekit passthrough YAML) or as a
:class:`~tensorsurgery.manifest.toml.Manifest`, with the command line's overrides (``sources`` for
``--source``, ``output`` for ``--output``), returns typed results and raises the package's
exceptions (:mod:`tensorsurgery.errors`); it never prints or exits.

Example:
    >>> import tensorsurgery as ts
    >>> plan = ts.plan("manifests/demo.toml")                      # headers only
    >>> result = ts.apply("manifests/demo.toml", force=True)        # doctest: +SKIP
    >>> ts.verify("manifests/demo.toml").ok                         # doctest: +SKIP
    True
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Union

from tensorsurgery.errors import ManifestError, NotVerifiedError, OutputExistsError, VerifyError
from tensorsurgery.formats.safetensors import Header as Header  # what inspect returns, re-exported
from tensorsurgery.formats.safetensors import read_header
from tensorsurgery.io.fsio import existing_ancestor
from tensorsurgery.io.hashing import DEFAULT_THREADS as DEFAULT_THREADS  # the CLI's defaults, re-exported
from tensorsurgery.io.hashing import MAX_THREADS as MAX_THREADS
from tensorsurgery.io.hashing import check_threads as check_threads
from tensorsurgery.manifest.loading import load_manifest, manifest_from_text
from tensorsurgery.manifest.repo_id import is_repo_id
from tensorsurgery.manifest.toml import Manifest, apply_overrides
from tensorsurgery.output.linking import CopiedLinks, find_copied_links
from tensorsurgery.output.record import read_record, require_folder
from tensorsurgery.output.recorded_sources import check_source_files
from tensorsurgery.output.target import check_output, temp_path
from tensorsurgery.planning.planner import Plan, build_plan
from tensorsurgery.sources.checkpoint import Checkpoint
from tensorsurgery.sources.local import load_checkpoint
from tensorsurgery.sources.resolver import resolve_source

if TYPE_CHECKING:  # imported where used: they load numpy, which plan and inspect do without
    from tensorsurgery.output.writer import WriteResult
    from tensorsurgery.verification.verifier import VerifyReport as VerifyReport

#: A manifest as the API takes it: a path, manifest text, or a parsed Manifest.
ManifestLike = Union[Manifest, str, "os.PathLike[str]"]
#: The ``sources`` overrides: a folder or repo id for a manifest's one source, or {name: model}.
SourcesLike = Union[str, "os.PathLike[str]", Mapping[str, Union[str, "os.PathLike[str]"]], None]
Progress = Callable[[int], None] | None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What :func:`apply` did: the plan, what was written, and, when pushing, the verification that
    came first and the URL of the upload (None when verification found differences)."""

    plan: Plan
    written: WriteResult
    verified: VerifyReport | None = None
    pushed: str | None = None


@dataclass(frozen=True, slots=True)
class PushResult:
    """What :func:`push` did: the verification (its ``mode`` says what was checked), and the URL of
    the upload."""

    verified: VerifyReport
    url: str


def load(manifest: ManifestLike, *, sources: SourcesLike = None,
         output: str | os.PathLike[str] | None = None, seed: int | None = None) -> Manifest:
    """The :class:`Manifest` for ``manifest`` with the overrides applied (``seed``: the merge's
    random seed, mergekit's ``--random-seed``, over the manifest's own).

    A ``str`` holding a newline is manifest text (every valid manifest has more than one line);
    any other ``str`` or path is a file to read.

    Raises:
        ManifestError: unreadable, not TOML/YAML, an unknown key, a wrong value, an empty output.
    """
    if output is not None and not str(output).strip():
        raise ManifestError("--output is empty; give the folder to write the output to")
    out = str(output) if output is not None else None
    given = _overrides(sources)
    if isinstance(manifest, Manifest):
        return apply_overrides(manifest, given, out, seed)
    if isinstance(manifest, str) and "\n" in manifest:
        return apply_overrides(manifest_from_text(manifest), given, out, seed)
    return apply_overrides(load_manifest(manifest, sources=given, output=out), {}, None, seed)


def _overrides(sources: SourcesLike) -> dict[str, str]:
    """``sources`` as source name -> model (``""``: the manifest's one source)."""
    if sources is None:
        return {}
    if isinstance(sources, (str, os.PathLike)):
        return {"": os.fspath(sources)}
    if isinstance(sources, Mapping) and all(isinstance(k, str) and isinstance(v, (str, os.PathLike))
                                            for k, v in sources.items()):
        return {k: os.fspath(v) for k, v in sources.items()}
    raise TypeError(f"sources= takes a folder or repo id (a str or path) for the manifest's one source, or "
                    f"a mapping of source names to them, such as {{\"base\": \"./Mistral-7B\"}}; "
                    f"got {type(sources).__name__}")


def resolve(manifest: Manifest, *, download: bool = True, keep_raw: bool = True) -> dict[str, Checkpoint]:
    """Every source of ``manifest`` as a :class:`Checkpoint`, by source name (``keep_raw``: keep
    the shard headers' bytes, which only planning with ``link`` needs; ``download=False``:
    Hub weights not yet cached are planned from their remote headers, nothing is downloaded).

    Raises:
        SourceError: a source cannot be found, read or resolved.
        HeaderError: a shard breaks the safetensors rules.
    """
    return {s.name: resolve_source(s.model, s.revision, name=s.name, download=download, keep_raw=keep_raw)
            for s in manifest.sources}


def plan(manifest: ManifestLike, *, sources: SourcesLike = None,
         output: str | os.PathLike[str] | None = None, link: bool = False, download: bool = False,
         seed: int | None = None) -> Plan:
    """The plan of ``manifest`` from the sources' headers alone: nothing is written, and (unless
    ``download``) no weight is downloaded.

    Raises:
        ManifestError, SourceError, HeaderError, PlanError: see :func:`load`, :func:`resolve` and
            :func:`tensorsurgery.planning.planner.build_plan`.

    Example:
        >>> len(plan("manifests/demo.toml").layers)
        48
    """
    m = load(manifest, sources=sources, output=output, seed=seed)
    return build_plan(m, resolve(m, download=download, keep_raw=link), link=link)


def apply(manifest: ManifestLike, *, sources: SourcesLike = None,
          output: str | os.PathLike[str] | None = None, force: bool = False, resume: bool = False,
          link: bool = False, progress: Progress = None, threads: int | None = None,
          push_to_hub: str | None = None, private: bool | None = None, seed: int | None = None) -> ApplyResult:
    """Build the output ``manifest`` describes, atomically; with ``push_to_hub`` (or the
    manifest's ``output.push_to_hub``), verify it against the plan and upload it if it verifies.

    Args:
        force: replace an existing output (only an earlier tensorsurgery output or an empty folder).
        resume: keep the finished shards of an interrupted run that verify against the plan.
        link: share shards identical to a source file instead of writing them (see README).
        progress: called with byte counts as shard bytes are written.
        threads: hashing threads (default: one per core, up to 8; at most 256).
        seed: the random seed of a merge that draws (DARE), as mergekit's ``--random-seed``.

    Raises:
        OptionError: ``threads`` out of range (checked first).
        OutputExistsError, WriteError, ReadError and those of :func:`plan`.
    """
    check_threads(threads)
    m = load(manifest, sources=sources, output=output, seed=seed)
    return execute(build_plan(m, resolve(m, keep_raw=link), link=link), force=force, resume=resume, progress=progress,
                   threads=threads, push_to_hub=push_to_hub or m.output.push_to_hub,
                   private=m.output.private if private is None else private)


def execute(plan: Plan, *, force: bool = False, resume: bool = False, progress: Progress = None,
            threads: int | None = None, push_to_hub: str | None = None, private: bool = True) -> ApplyResult:
    """Write an already-built ``plan`` (see :func:`apply`, which plans and then calls this)."""
    from tensorsurgery.output.writer import execute_plan
    written = execute_plan(plan, force=force, resume=resume, progress=progress, threads=check_threads(threads))
    if push_to_hub is None:
        return ApplyResult(plan, written)
    pushed = push(written.output, push_to_hub, plan=plan, private=private, threads=threads)
    return ApplyResult(plan, written, pushed.verified, pushed.url)


def verify(target: ManifestLike, output: str | os.PathLike[str] | None = None, *,
           sources: SourcesLike = None, progress: Progress = None, progress_total: Progress = None,
           threads: int | None = None, seed: int | None = None) -> VerifyReport:
    """Prove an output is what it should be; ``report.ok`` only when every byte is. ``progress`` is
    called with tensor bytes as they are checked; ``progress_total`` once before, with the bytes
    to check in all.

    * ``verify(MANIFEST[, OUTPUT])``: re-derive the plan from the sources and compare every file.
    * ``verify(OUTPUT_FOLDER)``: check it against its own ``tensorsurgery.json``; when the sources
      it records are still there (or given in ``sources``), against them too.

    Raises:
        OptionError: ``threads`` out of range (checked first).
        VerifyError: no output folder, or a record that cannot be used.
        ManifestError, SourceError, HeaderError, PlanError: see :func:`plan`.
    """
    from tensorsurgery.verification.verifier import verify_output, verify_record
    threads = check_threads(threads)
    if output is None and not isinstance(target, Manifest) and _is_folder(target):
        folder = Path(target)
        recorded = plan_from_record(folder, _overrides(sources))
        if recorded.plan is None:
            return replace(verify_record(folder, progress=progress, progress_total=progress_total, threads=threads),
                           sources_changed=recorded.changed)
        return replace(verify_output(recorded.plan, folder, progress=progress, progress_total=progress_total,
                                     threads=threads), mode="record+sources")
    m = load(target, sources=sources, output=output, seed=seed)
    folder = Path(m.output.path)
    # The plan first: a manifest that cannot be applied is that error, output folder or not.
    # An output made with --link groups shards differently; its record says so.
    link = _recorded_link(folder)
    the_plan = build_plan(m, resolve(m, keep_raw=link), link=link)
    return verify_output(the_plan, folder, progress=progress, progress_total=progress_total, threads=threads)


def _is_folder(target: str | os.PathLike[str]) -> bool:
    if isinstance(target, str) and "\n" in target:
        return False
    path = Path(target)
    if not path.exists() and path.suffix.lower() not in (".toml", ".yml", ".yaml"):
        raise VerifyError(f"{path}: output folder not found; give an output folder, or a manifest (and "
                          f"optionally its output folder)")
    return path.is_dir()


@dataclass(frozen=True, slots=True)
class RecordedPlan:
    """What :func:`plan_from_record` found: the recorded plan rebuilt from its sources, or None
    when they are not all at hand as apply read them; ``changed`` names the source files that
    are there but changed since apply (``SOURCE/FILE`` when the record has several sources)."""

    plan: Plan | None
    changed: tuple[str, ...] = ()


def plan_from_record(output: Path, sources: Mapping[str, str]) -> RecordedPlan:
    """The plan recorded in ``output``'s tensorsurgery.json, rebuilt from its sources when they
    are all still the files apply read (or given in ``sources``, by name; ``""`` is the first).

    The sources keep the names apply was given, so the rebuilt plan (and the model card made from
    it) is the one ``apply`` wrote; Hub sources resolve again by repo id and
    recorded commit, local ones from their recorded folders (a pulled copy's record names none:
    the record alone is checked). A recorded source file must be there
    with its recorded size and sha256 (:mod:`tensorsurgery.output.recorded_sources`): a source updated
    since apply is not what the output was made from, so the record alone is checked then.

    Raises:
        VerifyError: no usable record.
    """
    # Its tensor entries are checked (a wrong one is refused here, as verify would), not kept.
    record = replace(read_record(require_folder(output), "typed"), tensors=MappingProxyType({}))
    manifest = manifest_from_text(record.manifest, record.manifest_name)
    recorded = {s.get("name"): s for s in record.data["sources"] if isinstance(s, dict)}
    given = {(k or manifest.sources[0].name): v for k, v in sources.items()}
    # The models as apply was given them (after its --source overrides), as the card names them.
    models = {n: e["model"] for n, e in recorded.items() if isinstance(n, str) and isinstance(e.get("model"), str)}
    merge = record.data.get("merge")
    seed = merge.get("seed") if isinstance(merge, dict) else None  # given to apply, not in a mergekit YAML
    manifest = apply_overrides(manifest, {**models, **given}, str(output), seed if isinstance(seed, int) else None)
    roots: dict[str, Path] = {}
    changed: list[str] = []
    for spec in manifest.sources:
        if spec.name in given:
            continue
        entry = recorded.get(spec.name, {})
        root = _recorded_root(entry)
        if root is None:
            return RecordedPlan(None)  # a pulled copy's local source: the record alone is checked
        found = check_source_files(root, entry.get("files", []))
        if found.missing:
            return RecordedPlan(None)  # the sources are gone: the record alone is checked
        prefix = f"{spec.name}/" if len(manifest.sources) > 1 else ""
        changed += [prefix + name for name in found.changed]
        roots[spec.name] = root
    if changed:
        return RecordedPlan(None, tuple(changed))
    checkpoints = {}
    for spec in manifest.sources:
        entry = recorded.get(spec.name, {})
        if spec.name in given:
            checkpoints[spec.name] = resolve_source(given[spec.name], name=spec.name, keep_raw=record.link)
        elif isinstance(entry.get("repo_id"), str):
            # Cached weights only: verifying an output must never download a model (a record can
            # name any repo).
            checkpoints[spec.name] = resolve_source(entry["repo_id"], entry.get("revision"), name=spec.name,
                                                    download=False, keep_raw=record.link)
        else:
            checkpoints[spec.name] = load_checkpoint(roots[spec.name], keep_raw=record.link)
    return RecordedPlan(build_plan(manifest, checkpoints, link=record.link))


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _recorded_root(entry: Mapping[str, object]) -> Path | None:
    """Where a recorded source's files are on this machine: the recorded folder, or for a Hub
    source recorded without one (the record push uploads names no local path) its snapshot in
    this machine's cache; None for a local source recorded without one."""
    root, repo_id, revision = entry.get("root"), entry.get("repo_id"), entry.get("revision")
    if isinstance(root, str):
        return Path(root)
    # Only what apply records (a repo id and a commit): a record naming anything else must not
    # make verify look outside the cache.
    if isinstance(repo_id, str) and is_repo_id(repo_id) and isinstance(revision, str) and _COMMIT.fullmatch(revision):
        from tensorsurgery.sources.hub import snapshot_folder
        return snapshot_folder(repo_id, revision)
    return None


def _recorded_link(output: Path) -> bool:
    """Whether the record in ``output`` says it was planned with ``--link`` (False without one)."""
    try:
        return read_record(output, "head").link
    except VerifyError:
        return False


def push(output: str | os.PathLike[str], repo_id: str, *, plan: Plan | None = None, private: bool = True,
         progress: Progress = None, progress_total: Progress = None, threads: int | None = None,
         api: object = None) -> PushResult:
    """Verify ``output`` (against ``plan``, else against its record and sources), then upload it to
    the Hub model repo ``repo_id``; nothing is uploaded unless it verifies, and then only the files
    verify read (a file swapped or changed since is refused). ``progress`` and
    ``progress_total`` are the verification's (see :func:`verify`).

    Raises:
        OptionError: ``threads`` out of range (checked first).
        VerifyError: no output folder or record.
        NotVerifiedError: the output does not verify (its ``report`` says how); nothing uploaded.
        WriteError: a file changed since it was verified (nothing uploaded), or the upload failed
            (the folder is untouched).
    """
    from tensorsurgery.publish.push_files import stamp_folder
    from tensorsurgery.publish.upload import push_folder
    from tensorsurgery.verification.verifier import verify_output
    threads = check_threads(threads)
    folder = require_folder(Path(output))
    # Before verify reads them: the upload must read these very files (see tensorsurgery.publish.push_files).
    stamps = stamp_folder(folder)
    report = (verify_output(plan, folder, progress=progress, progress_total=progress_total, threads=threads)
              if plan is not None else verify(folder, progress=progress, progress_total=progress_total,
                                              threads=threads))
    if not report.ok:
        raise NotVerifiedError(f"{folder} does not verify ({len(report.differences)} difference(s)); "
                               f"nothing was pushed to {repo_id}", report)
    return PushResult(report, push_folder(folder, repo_id, private=private, api=api, verified=stamps))


def inspect(path: str | os.PathLike[str]) -> Checkpoint | Header:
    """A checkpoint folder's :class:`Checkpoint`, or one safetensors file's :class:`Header`.

    Raises:
        SourceError, HeaderError: missing, special, inconsistent or broken files.
    """
    path = Path(path)
    return load_checkpoint(path) if path.is_dir() else read_header(path)


# -- what the command line shows around a run (it reaches the stages through this module only) --

def copied_links(plan: Plan) -> tuple[CopiedLinks, ...]:
    """Which of the links a ``link=True`` plan asks for can be made (the devices looked up on
    disk), for ``plan``'s and ``--dry-run``'s summary and the disk space apply needs."""
    return find_copied_links(plan)


def free_bytes(output: str | os.PathLike[str]) -> int | None:
    """Free bytes on the file system ``output`` would be written to (its nearest existing folder),
    or None when that cannot be told."""
    try:
        return shutil.disk_usage(existing_ancestor(Path(output).expanduser().resolve())).free
    except OSError:
        return None


def temp_folder(plan: Plan) -> Path:
    """The temporary folder :func:`execute` writes ``plan`` into before renaming it into place
    (what ``--resume`` takes up after an interruption)."""
    return temp_path(Path(os.path.abspath(plan.output.expanduser())))


def target_refusal(plan: Plan) -> str | None:
    """Why :func:`execute` would refuse ``plan``'s output even with ``force=True`` (a source, the
    current folder, a mount point...), or None: what a dry run says without refusing."""
    try:
        check_output(plan, force=True)
    except OutputExistsError as e:
        return str(e)
    return None
