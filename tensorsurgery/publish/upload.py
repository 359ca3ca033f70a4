"""Upload a finished output folder to the Hugging Face Hub (``[output] push_to_hub``,
``apply --push-to-hub``), with huggingface_hub: ``create_repo(exist_ok=True)`` then one
``create_commit`` of the files the record names. Private by default. :func:`tensorsurgery.api.push`
calls this only after ``verify`` passed, and hands it the stamps of the files verify read: what
is uploaded is read from descriptors checked to be those files (:mod:`tensorsurgery.publish.push_files`),
never by name.

Nothing uploaded names a local path: ``tensorsurgery.json`` is uploaded as
:func:`~tensorsurgery.output.record.published_record` makes it (built in memory; the local record keeps
the sources' folders, for ``verify OUTPUT`` here), and the card already names none; a file that
still names one (:mod:`tensorsurgery.publish.path_leaks`: a card of an older tensorsurgery, a copied file)
stops the push before anything is uploaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tensorsurgery.errors import SourceError, TensorSurgeryError, VerifyError, WriteError
from tensorsurgery.io.fsio import INDEX_LIMIT, parse_json
from tensorsurgery.manifest.repo_id import is_push_target
from tensorsurgery.output.expected import json_bytes
from tensorsurgery.output.record import Record, parse_record, published_record
from tensorsurgery.publish.path_leaks import find_local_path
from tensorsurgery.publish.push_files import FileStamp, UploadFiles
from tensorsurgery.sources.checkpoint import RECORD_NAME


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                api: Any = None, commit_message: str | None = None,
                verified: Mapping[str, FileStamp] | None = None) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` into it as one commit.

    Each file is opened once, without following links, and checked on that descriptor, which is
    then what is uploaded (:mod:`tensorsurgery.publish.push_files`): a regular file inside ``folder``;
    the record read from it; each shard of the size and header bytes it records, each other file
    of the sha256 it records; with ``verified``, the very files verify read.

    Args:
        folder: a tensorsurgery output (it must hold ``tensorsurgery.json``); the files its record
            names are uploaded, the record itself as :func:`published_record` makes it.
        repo_id: ``org/name`` or ``name``.
        private: visibility when the repo is created; an existing repo keeps its visibility.
        token: a Hub token; None uses huggingface_hub's default (``HF_TOKEN`` or ``hf auth login``).
        api: an ``HfApi``-like object (tests pass a recording fake); None makes an ``HfApi``.
        commit_message: defaults to "Upload <folder name> (tensorsurgery)".
        verified: the stamps of the folder's files taken before verify passed
            (:func:`~tensorsurgery.publish.push_files.stamp_folder`); a file that is not the one stamped is
            refused. None: no verify came first (:func:`tensorsurgery.api.push` makes one).

    Returns:
        The commit URL (or, from a client that returns none, the repo URL).

    Raises:
        WriteError: not a finished output (no usable record), a bad repo id, a file to upload that
            is a link, not a regular file, changed since it was verified or not what the record
            says, a file that names a local path, or the Hub refused or could not be reached; the
            message is one line, nothing was uploaded unless the Hub refused mid-commit, and the
            local folder is untouched.
        PlanError: a local path of the recorded manifest cannot be taken out of its text.

    Example:
        >>> push_folder("out/solar-10.7b-dus", "me/solar-10.7b-dus")  # doctest: +SKIP
        'https://huggingface.co/me/solar-10.7b-dus/commit/...'
    """
    folder = Path(folder)
    if not is_push_target(repo_id):
        raise WriteError(f"push_to_hub: {repo_id!r} is not a Hugging Face repo id; use \"org/name\"")
    if not (folder / RECORD_NAME).is_file():
        raise WriteError(f"{folder}: no {RECORD_NAME}, so not a finished tensorsurgery output; "
                         f"not pushed to {repo_id}")
    with UploadFiles(folder, repo_id, verified) as files:
        record = _read_record(files, folder, repo_id)
        names = sorted({*record.shards, *record.files})
        for name in names:
            if name in record.shards:
                files.check_shard(record.shards[name])
            else:
                files.check_sha256(name, record.files[name])
        # The local record names the sources' folders; the uploaded one is made here, in memory.
        uploaded = json_bytes(published_record(record.data))
        leak = find_local_path(folder, record, uploaded, files.read)
        if leak is not None:
            raise WriteError(f"{folder / leak.file}: names the local path {leak.path} ({leak.why}); nothing "
                             f"uploaded may name one, so nothing was pushed to {repo_id}")
        files.check_unchanged()
        return _commit(files, names, uploaded, folder, repo_id, private=private, token=token, api=api,
                       commit_message=commit_message or f"Upload {folder.name} (tensorsurgery)")


def _read_record(files: UploadFiles, folder: Path, repo_id: str) -> Record:
    """The record, read from the descriptor push checked (the one verify read)."""
    path = folder / RECORD_NAME
    raw = files.read(RECORD_NAME, INDEX_LIMIT)
    try:
        return parse_record(parse_json(raw, path), path)
    except SourceError as e:
        raise WriteError(f"unreadable provenance record: {e}; not pushed to {repo_id}") from None
    except VerifyError as e:
        raise WriteError(f"{e}; not pushed to {repo_id}") from None


def _commit(files: UploadFiles, names: list[str], uploaded: bytes, folder: Path, repo_id: str, *, private: bool,
            token: str | None, api: Any, commit_message: str) -> str:
    """create_repo, then one create_commit of ``names`` (from their checked descriptors) and the
    record as ``uploaded``."""
    from huggingface_hub import CommitOperationAdd
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
    try:
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=files.upload_source(name))
                      for name in names]
        operations.append(CommitOperationAdd(path_in_repo=RECORD_NAME, path_or_fileobj=uploaded))
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", token=token,
                                   commit_message=commit_message)
    except TensorSurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - HTTP, xet and validation errors alike: one line, folder intact
        # Not `hf upload`: that would upload the local record, which names the sources' folders.
        raise WriteError(f"{repo_id}: push to the Hugging Face Hub failed ({_first_line(e)}); the output "
                         f"is complete in {folder}; retry with `tensorsurgery push {folder} {repo_id}`") from e
    return str(getattr(commit, "commit_url", None) or getattr(repo, "url", None) or repo or repo_id)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
