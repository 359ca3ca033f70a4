"""Command line: ``tensorsurgery apply|plan|verify|push|inspect``: argparse -> :mod:`tensorsurgery.api`
-> print. The only module that prints or exits.

Errors are one line on stderr and exit code 2 (``--traceback`` shows the Python traceback);
``verify`` exits 1 when it finds differences; Ctrl-C exits 130 and SIGTERM 143.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from tensorsurgery import api
from tensorsurgery._version import __version__
from tensorsurgery.errors import COMMAND_LINE_WORDS, NotVerifiedError, TensorSurgeryError
from tensorsurgery.report import (
    checkpoint_as_dict,
    disk_needed,
    format_checkpoint,
    format_header,
    format_plan,
    header_as_dict,
    iter_differences,
    plan_as_dict,
    printable,
)
from tensorsurgery.units import format_bytes

if TYPE_CHECKING:
    from tensorsurgery.api import VerifyReport


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup runs like for Ctrl-C."""


#: The temporary folder of the apply in progress, to say after an interrupt whether --resume helps.
_apply_tmp: Path | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    # The writer's threads are the parallelism: a BLAS product (a LoRA merge's) on each of them
    # that spread itself over every core again ran 1.4x slower (OpenBLAS's threads spin). Read
    # when numpy loads, which the command line does only after this.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
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
    words = COMMAND_LINE_WORDS.set(True)
    notes = _NoteHandler()
    logger = logging.getLogger("tensorsurgery")
    logger.addHandler(notes)
    try:
        return _run(args)
    finally:
        logger.removeHandler(notes)
        COMMAND_LINE_WORDS.reset(words)


class _NoteHandler(logging.Handler):
    """The library's notes (its ``tensorsurgery`` logger: a cached revision used because the Hub
    cannot be reached) as ``note:`` lines on stderr, the one the command runs with."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    """``args.func(args)``, every failure said as one line with its exit code."""
    try:
        code: int = args.func(args)
        return code
    except TensorSurgeryError as e:
        if args.traceback:  # the traceback too, with the same exit code
            traceback.print_exc()
        print(f"tensorsurgery: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"tensorsurgery: interrupted; {_interrupted_note(e)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`tensorsurgery plan ... | head`): not an error worth a traceback.
        sys.stdout = open(os.devnull, "w")
        return 0
    except _Terminated as e:
        print(f"tensorsurgery: terminated; {_interrupted_note(e)}", file=sys.stderr)
        return 143


def _interrupted_note(e: BaseException) -> str:
    placed = getattr(e, "output_note", None)  # set by the writer once the new output is in place
    if placed is not None:
        return str(placed)
    if _apply_tmp is None:
        return "nothing was written"
    finished = sorted(_apply_tmp.glob("*.safetensors")) if _apply_tmp.is_dir() else []
    if finished:
        return (f"nothing was written under the output name; {len(finished)} finished shard(s) are kept in "
                f"{_apply_tmp}: run the same command with --resume to keep them, or without it to start over")
    return "nothing was written under the output name; run the same command to start over"


def _raise_terminated(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensorsurgery", description="Build new LLM checkpoints out of old "
                                "ones from safetensors headers and byte ranges, without loading a model.")
    p.add_argument("--version", action="version", version=f"tensorsurgery {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the Python traceback on errors")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        # default=SUPPRESS: a subcommand's own default would overwrite a --traceback given before it.
        c.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        c.set_defaults(func=func)
        return c

    def sources(c: argparse.ArgumentParser) -> None:
        c.add_argument("--source", action="append", default=[], metavar="[NAME=]PATH",
                       help="use this local folder or repo id for a source (NAME= when there are several)")

    def seed(c: argparse.ArgumentParser) -> None:
        c.add_argument("--random-seed", type=int, metavar="N",
                       help="the random seed of a merge that draws (dare_*, della*), as mergekit's "
                            "--random-seed (overrides [merge] seed)")

    def threads(c: argparse.ArgumentParser) -> None:
        c.add_argument("--threads", type=int, metavar="N",
                       help=f"threads that hash (and compare) tensors, 1 to {api.MAX_THREADS} (default "
                            f"{api.DEFAULT_THREADS}: one per core, up to 8)")

    c = command("apply", "build the output checkpoint the manifest describes", _cmd_apply)
    c.add_argument("manifest", type=Path, help="manifest TOML (or mergekit passthrough YAML)")
    sources(c)
    c.add_argument("--output", metavar="PATH", help="override output.path")
    c.add_argument("--force", action="store_true",
                   help="replace an existing output folder (only an earlier tensorsurgery output or an empty folder)")
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
    threads(c)
    seed(c)

    c = command("plan", "show the plan from the headers alone: layer map, seams, shards, bytes", _cmd_plan)
    c.add_argument("manifest", type=Path, help="manifest TOML (or mergekit passthrough YAML)")
    sources(c)
    c.add_argument("--output", metavar="PATH", help="override output.path")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--link", action="store_true", help="plan as `apply --link` would")
    seed(c)

    c = command("verify", "prove an output is what its manifest asks for, byte for byte (exit 0 only then, "
                "1 with the list of differences). verify MANIFEST [OUTPUT]: re-derive the plan from the sources "
                "and compare every file. verify OUTPUT: check it against its own tensorsurgery.json, and "
                "against the sources too when they are present.", _cmd_verify)
    c.add_argument("target", type=Path, help="a manifest, or an output folder")
    c.add_argument("output", type=Path, nargs="?", help="the output folder (default: the manifest's output.path)")
    sources(c)
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    threads(c)
    seed(c)

    c = command("push", "verify an output (against its record and sources), then upload it to a Hugging Face "
                "model repo; nothing is uploaded unless it verifies", _cmd_push)
    c.add_argument("output", type=Path, help="the output folder")
    c.add_argument("repo", help="the model repo, org/name")
    c.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = command("inspect", "show a checkpoint's shards, tensors, dtypes, layers and bytes", _cmd_inspect)
    c.add_argument("path", type=Path, help="a checkpoint folder or one .safetensors file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
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


class _Bar(NamedTuple):
    """A progress bar's two callbacks: ``update`` (bytes done) and ``total`` (set the bytes to do,
    when they are known only once the command has started)."""

    update: Callable[[int], Any]
    total: Callable[[int], None]


@contextmanager
def _progress(args: argparse.Namespace, desc: str, total: int | None = None) -> Iterator[_Bar | None]:
    """A tqdm bar on a terminal (bytes, rate, ETA once the total is known), else None."""
    if getattr(args, "no_progress", False) or getattr(args, "json", False) or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        columns = lines = 0
    # A terminal that reports no size (`script`, some CI runners' ptys) gets no bar at all from
    # tqdm's dynamic size (0 rows: nothing is drawn): give it a fixed one.
    width: dict[str, Any] = ({"dynamic_ncols": True} if columns and lines
                             else {"ncols": columns or 80, "nrows": lines or 24})
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
               smoothing=0.1, **width)

    def set_total(n: int) -> None:
        bar.total = n
        bar.refresh()
    try:
        yield _Bar(bar.update, set_total)
    finally:
        bar.close()


def _cmd_plan(args: argparse.Namespace) -> int:
    plan = api.plan(args.manifest, sources=_source_overrides(args.source), output=args.output, link=args.link,
                    seed=args.random_seed)
    copied = api.copied_links(plan)
    if args.json:
        print(json.dumps(plan_as_dict(plan, copied), indent=2))
    else:
        print(format_plan(plan, free=api.free_bytes(plan.output), copied=copied))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    global _apply_tmp
    api.check_threads(args.threads)  # before planning: a Hub source may take a while to resolve
    manifest = api.load(args.manifest, sources=_source_overrides(args.source), output=args.output,
                        seed=args.random_seed)
    repo = args.push_to_hub or manifest.output.push_to_hub
    if args.dry_run:
        plan = api.plan(manifest, link=args.link)
        print(format_plan(plan, free=api.free_bytes(plan.output), copied=api.copied_links(plan)))
        _dry_run_notes(plan, args)
        print("dry run: nothing written" + (f", nothing pushed to {repo}" if repo else ""))
        return 0
    plan = api.plan(manifest, link=args.link, download=True)
    _apply_tmp = api.temp_folder(plan)
    with _progress(args, "writing", disk_needed(plan, api.copied_links(plan))) as bar:
        result = api.execute(plan, force=args.force, resume=args.resume, progress=bar and bar.update,
                             threads=args.threads)
    _apply_tmp = None
    written = result.written
    for note in written.notes:
        print(f"note: {note}", file=sys.stderr)
    rate = written.nbytes / written.seconds if written.seconds else 0
    print(f"wrote {written.output}")
    print(f"  {len(plan.layers)} layers, {plan.tensor_count} tensors ({format_bytes(plan.total_size)} of tensor "
          f"data) in {len(plan.shards)} shard(s)")
    print(f"  {format_bytes(written.nbytes)} of shard files written in {written.seconds:.1f} s "
          f"({format_bytes(rate)}/s)")
    print(f"  files: {', '.join(written.files)}")
    if repo:
        return _push(args, written.output, repo, private=manifest.output.private, plan=plan)
    return 0


def _dry_run_notes(plan: Any, args: argparse.Namespace) -> None:
    """What apply would refuse, said without refusing: a dry run writes nothing."""
    target = Path(os.path.abspath(plan.output.expanduser()))
    if (target.exists() or target.is_symlink()) and not args.force:
        print(f"note: {target} exists: apply would need --force to replace it")
    refusal = api.target_refusal(plan)
    if refusal:
        print(f"note: apply would refuse: {refusal}")


def _push(args: argparse.Namespace, output: Path, repo: str, *, private: bool, plan: Any = None) -> int:
    try:
        with _progress(args, "verifying") as bar:
            result = api.push(output, repo, plan=plan, private=private, progress=bar and bar.update,
                              progress_total=bar and bar.total, threads=getattr(args, "threads", None))
    except NotVerifiedError as e:
        for line in iter_differences(e.report):
            print(line, file=sys.stderr)
        print(f"tensorsurgery: {output} does not verify; not pushed to {repo}", file=sys.stderr)
        return 1
    print(f"verified {output} ({_mode_text(result.verified)}); pushed to {result.url}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    return _push(args, args.output, args.repo, private=not args.public)


def _cmd_verify(args: argparse.Namespace) -> int:
    with _progress(args, "verifying") as bar:
        report = api.verify(args.target, args.output, sources=_source_overrides(args.source),
                            progress=bar and bar.update, progress_total=bar and bar.total, threads=args.threads,
                            seed=args.random_seed)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        print(f"verified {report.output}: {report.files} files, {report.tensors} tensors "
              f"({format_bytes(report.nbytes)} of tensor data); {_mode_text(report)}")
    else:
        _print_differences(report)
    return 0 if report.ok else 1


def _print_differences(report: VerifyReport) -> None:
    for line in iter_differences(report):
        print(line)
    if report.sources_changed:
        print(_changed_note(report))
    print(f"{report.output}: {len(report.differences)} difference(s); the output is NOT what "
          f"{'its record' if report.mode == 'record' else 'the manifest'} says")


def _mode_text(report: VerifyReport) -> str:
    """What a passing verify checked, for its last line (and push's): which mode ran, and in
    record mode why the sources were not compared."""
    if report.mode != "record":
        return _MODES[report.mode]
    return f"{_MODES['record']}; {_changed_note(report) if report.sources_changed else _NOT_FOUND}"


def _changed_note(report: VerifyReport) -> str:
    return (f"sources changed since apply: {', '.join(map(printable, report.sources_changed))}; checked the output "
            f"against its record only")


_MODES = {"manifest": "every byte matches the manifest applied to the sources",
          "record+sources": "every byte matches the recorded manifest applied to the sources",
          "record": "every file matches the sha256 in tensorsurgery.json"}
#: Why only the record was checked, when no source changed: they are not at hand.
_NOT_FOUND = "sources not found, so not compared with them"


def _cmd_inspect(args: argparse.Namespace) -> int:
    found = api.inspect(args.path)
    if isinstance(found, api.Header):
        print(json.dumps(header_as_dict(found), indent=2) if args.json else format_header(found))
    else:
        print(json.dumps(checkpoint_as_dict(found), indent=2) if args.json else format_checkpoint(found))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
