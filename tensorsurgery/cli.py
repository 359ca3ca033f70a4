"""Command line: ``tensorsurgery apply|plan|verify|inspect``. The only module that prints or exits.

Errors are one line on stderr and exit code 2 (``--traceback`` shows the Python traceback);
Ctrl-C exits 130 and SIGTERM 143, with the temporary folder removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import TensorSurgeryError, VerifyError
from .format import read_header
from .manifest import Manifest, load_manifest
from .plan import Plan, build_plan
from .provenance import PROVENANCE_NAME
from .report import format_bytes, format_plan, plan_as_dict
from .source import resolve_source


_NOTHING_WRITTEN = ("nothing was written under the output name; run the same command with --resume "
                    "to keep the finished shards, or without it to start over")


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup runs like for Ctrl-C."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take `verify MANIFEST --source S OUTPUT` (a positional after an option
    # whose nargs='?' positional was already passed over): accept that order too.
    if extra and getattr(args, "func", None) is _cmd_verify and args.output is None \
            and len(extra) == 1 and not extra[0].startswith("-"):
        args.output, extra = Path(extra[0]), []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    signal.signal(signal.SIGTERM, _raise_terminated)
    if hasattr(signal, "SIGXFSZ"):
        # Past RLIMIT_FSIZE a write must fail with EFBIG (reported), not kill the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return args.func(args)
    except TensorSurgeryError as e:
        if args.traceback:
            raise
        print(f"tensorsurgery: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorsurgery: interrupted; {_NOTHING_WRITTEN}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`tensorsurgery plan ... | head`): not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")
        return 0
    except _Terminated:
        print(f"tensorsurgery: terminated; {_NOTHING_WRITTEN}", file=sys.stderr)
        return 143


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorsurgery", description="Build new LLM checkpoints out of old "
                                "ones from safetensors headers and byte ranges, without loading a model.")
    p.add_argument("--version", action="version", version=f"tensorsurgery {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def manifest_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("manifest", type=Path, help="manifest TOML (or mergekit passthrough YAML)")
        c.add_argument("--source", action="append", default=[], metavar="[NAME=]PATH",
                       help="use this local folder or repo id for a source (NAME= when there are several)")
        c.add_argument("--output", metavar="PATH", help="override output.path")
        # default=SUPPRESS: a subcommand's own default would overwrite a --traceback given before it.
        c.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return c

    c = manifest_command("apply", "build the output checkpoint the manifest describes")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--resume", action="store_true",
                   help="keep the finished shards of an interrupted run (verified against the plan)")
    c.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    c.add_argument("--link", action="store_true",
                   help="output shards byte-identical to a source shard are reflinked or hard-linked "
                        "instead of written (the output then shares those files with the source)")
    c.add_argument("--push-to-hub", metavar="REPO",
                   help="after apply and verify, upload the output to this Hugging Face model repo "
                        "(created private unless output.private = false; overrides output.push_to_hub)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_apply)

    c = manifest_command("plan", "show the plan from the headers alone: layer map, seams, shards, bytes")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--link", action="store_true", help="plan as `apply --link` would")
    c.set_defaults(func=_cmd_plan)

    c = sub.add_parser("verify", help="prove an output is what its manifest asks for, byte for byte "
                       "(exit 0 only then, 1 with the list of differences)",
                       description="verify MANIFEST [OUTPUT]: re-derive the plan from the sources and compare "
                       "every file and byte. verify OUTPUT: check against its own tensorsurgery.json (hashes), "
                       "and against the sources too when they are present.")
    c.add_argument("target", type=Path, help="a manifest, or an output folder")
    c.add_argument("output", type=Path, nargs="?", help="the output folder (default: the manifest's output.path)")
    c.add_argument("--source", action="append", default=[], metavar="[NAME=]PATH",
                   help="use this local folder or repo id for a source (NAME= when there are several)")
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_verify)

    c = sub.add_parser("inspect", help="show a checkpoint's shards, tensors, dtypes, layers and bytes")
    c.add_argument("path", type=Path, help="a checkpoint folder or one .safetensors file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_inspect)
    return p


def _source_overrides(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        # "NAME=PATH" unless the part before '=' looks like a path itself.
        if sep and name and "/" not in name:
            out[name] = path
        else:
            out[""] = v
    return out


def _load_manifest(args: argparse.Namespace) -> Manifest:
    return load_manifest(args.manifest, sources=_source_overrides(args.source), output=args.output)


def _load_plan(args: argparse.Namespace, manifest: Manifest | None = None, *, download: bool = True) -> Plan:
    """``download=False``: hub sources not yet cached are planned from remote headers."""
    manifest = manifest or _load_manifest(args)
    checkpoints = {s.name: resolve_source(s.model, s.revision, name=s.name, download=download)
                   for s in manifest.sources}
    return build_plan(manifest, checkpoints, link=getattr(args, "link", False))


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = _load_plan(args, download=False)
    if args.json:
        print(json.dumps(plan_as_dict(plan), indent=2))
    else:
        print(format_plan(plan, free=_free_bytes(plan.output)))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .writer import check_output, execute_plan
    manifest = _load_manifest(args)
    push_repo = args.push_to_hub or manifest.output.push_to_hub
    plan = _load_plan(args, manifest, download=not args.dry_run)
    check_output(plan, force=args.force)
    if args.dry_run:
        print(format_plan(plan, free=_free_bytes(plan.output)))
        print("dry run: nothing written" + (f", nothing pushed to {push_repo}" if push_repo else ""))
        return 0
    bar = _progress_bar(args, "writing", plan.nbytes)
    try:
        result = execute_plan(plan, force=args.force, resume=args.resume, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    rate = result.nbytes / result.seconds if result.seconds else 0
    print(f"wrote {result.output}")
    print(f"  {len(plan.layers)} layers, {len(plan.tensors)} tensors in {len(plan.shards)} shard(s), "
          f"{format_bytes(result.nbytes)} in {result.seconds:.1f} s ({format_bytes(rate)}/s)")
    print(f"  files: {', '.join(result.files)}")
    if push_repo:
        return _push(args, plan, result.output, push_repo, private=manifest.output.private)
    return 0


def _push(args: argparse.Namespace, plan: Plan, output: Path, repo: str, *, private: bool) -> int:
    """Verify the fresh output against its plan, then upload it; a difference means no push."""
    from .push import push_folder
    from .verify import iter_differences, verify_output
    bar = _progress_bar(args, "verifying")
    try:
        report = verify_output(plan, output, progress=bar and bar.update)
    finally:
        if bar is not None:
            bar.close()
    if not report.ok:
        for line in iter_differences(report):
            print(line, file=sys.stderr)
        print(f"tensorsurgery: {output} does not verify against the plan; not pushed to {repo}", file=sys.stderr)
        return 1
    url = push_folder(output, repo, private=private)
    print(f"verified {output}; pushed to {url}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .record import verify_record
    from .verify import iter_differences, verify_output
    if args.output is None and not args.target.exists() and args.target.suffix.lower() not in _MANIFEST_SUFFIXES:
        raise VerifyError(f"{args.target}: output folder not found; give an output folder, or a manifest "
                          f"(and optionally its output folder)")
    bar = _progress_bar(args, "verifying")
    try:
        if args.target.is_dir() and args.output is None:
            plan = _plan_from_record(args.target, _source_overrides(args.source))
            report = (verify_output(plan, args.target, progress=bar and bar.update) if plan is not None
                      else verify_record(args.target, progress=bar and bar.update))
            if plan is not None:
                report = replace(report, mode="record+sources")
        else:
            args.manifest, args.output = args.target, (str(args.output) if args.output else None)
            manifest = _load_manifest(args)
            # An output made with --link groups shards differently; its record says so.
            args.link = _recorded_link(Path(manifest.output.path))
            plan = _load_plan(args, manifest)
            report = verify_output(plan, plan.output, progress=bar and bar.update)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        print(f"verified {report.output}: {report.tensors} tensors, {format_bytes(report.nbytes)} "
              f"({_MODES[report.mode]})")
    else:
        for line in iter_differences(report):
            print(line)
        print(f"{report.output}: {len(report.differences)} difference(s); the output is NOT what "
              f"{'its record' if report.mode == 'record' else 'the manifest'} says")
    return 0 if report.ok else 1


_MANIFEST_SUFFIXES = (".toml", ".yml", ".yaml")
_MODES = {"manifest": "every byte matches the manifest applied to the sources",
          "record+sources": "every byte matches the recorded manifest applied to the sources",
          "record": "every tensor matches the sha256 in tensorsurgery.json; sources not found, "
                    "so not compared with them"}


def _plan_from_record(output: Path, overrides: dict[str, str]) -> Plan | None:
    """The plan recorded in ``output``'s tensorsurgery.json, rebuilt from its sources when they
    are all still at hand (or given with --source); None otherwise."""
    from .manifest import apply_overrides, parse_manifest_text
    from .record import read_record
    record = read_record(output)
    manifest = parse_manifest_text(Path(record.get("manifest_name", "manifest.toml")), record.get("manifest", ""))
    roots = {s["name"]: s["root"] for s in record.get("sources", [])}
    roots.update({(k or manifest.sources[0].name): v for k, v in overrides.items()})
    if not all(Path(roots.get(s.name, "")).is_dir() for s in manifest.sources):
        return None
    manifest = apply_overrides(manifest, roots, str(output))
    checkpoints = {s.name: resolve_source(s.model, name=s.name) for s in manifest.sources}
    return build_plan(manifest, checkpoints, link=bool(record.get("link")))


def _recorded_link(output: Path) -> bool:
    """Whether the provenance record in ``output`` says it was planned with ``--link``."""
    try:
        return bool(json.loads((output / PROVENANCE_NAME).read_text(encoding="utf-8")).get("link"))
    except (OSError, ValueError, AttributeError):
        return False


def _progress_bar(args: argparse.Namespace, desc: str, total: int | None = None):
    if args.no_progress or getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
                smoothing=0.1)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import format_checkpoint, checkpoint_as_dict
    from .source import load_checkpoint
    if args.path.is_file():
        header = read_header(args.path)
        data = {"file": str(args.path), "tensors": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "nbytes": e.nbytes} for e in header.entries]}
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for e in header.entries:
                print(f"{e.name:60s} {e.dtype:6s} {str(list(e.shape)):20s} {format_bytes(e.nbytes)}")
            print(f"{len(header.entries)} tensors, {format_bytes(header.data_size)}")
        return 0
    ckpt = load_checkpoint(args.path)
    print(json.dumps(checkpoint_as_dict(ckpt), indent=2) if args.json else format_checkpoint(ckpt))
    return 0


def _free_bytes(output: Path) -> int | None:
    path = output.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
