"""Hugging Face Hub sources, through huggingface_hub and its standard cache.

The library reads ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` itself. Only
what a plan needs is fetched, in ONE weight format: the Hugging Face shards when the repo has them,
else Mistral's native ``consolidated*.safetensors`` (never both, as mergekit does), plus
``config.json`` or ``params.json``, the index, the tokenizer and generation files and the card
(``README.md``, whose license the output's card carries over).

``tensorsurgery plan`` resolves with ``download=False``: shard headers that are not cached are read
with two HTTP range requests per shard (the way ``HfApi.parse_safetensors_file_metadata`` does), so
the plan and the disk estimate come before any weight is downloaded. The library's own
``get_safetensors_metadata`` is not enough: it parses the header but does not expose its length,
and the plan needs the absolute offset of every tensor.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from tensorsurgery.errors import HeaderError, SourceError
from tensorsurgery.formats.safetensors import MAX_HEADER_SIZE, Header, parse_header
from tensorsurgery.io import fsio
from tensorsurgery.sources.checkpoint import Checkpoint, SourceFiles, index_weight_map, select_files
from tensorsurgery.sources.local import FolderReader, read_checkpoint

#: First range read of a remote header; most headers fit (HfApi reads 100 kB for the same reason).
_FIRST_READ = 100_000


def snapshot_folder(repo_id: str, commit: str) -> Path:
    """Where the Hugging Face cache keeps (or will keep) the files of ``repo_id`` at ``commit``."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    return (Path(constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")
            / "snapshots" / commit)


#: Seconds the first request to the Hub may take before the Hub counts as unreachable and the cache
#: is used (``HF_HUB_ETAG_TIMEOUT`` when set): one try, no retries, so a cached source starts at
#: once without a network (huggingface_hub's own calls retry for ~47 s first).
PROBE_TIMEOUT = 3.0

#: Where tensorsurgery's notes go (the CLI prints them as ``note:`` lines).
logger = logging.getLogger("tensorsurgery")


class HubClient:
    """The few Hub operations a source needs, over huggingface_hub. Tests pass a fake with the
    same methods; the token is the library's default (``HF_TOKEN`` or ``hf auth login``).

    The first request is a probe with a short timeout and no retries: when it fails for want of
    a network (refused, unanswered, no route), this client uses the cache alone from then on."""

    def __init__(self, token: str | None = None):
        from huggingface_hub import HfApi
        self.token = token
        self.api = HfApi(token=token)
        #: Why the Hub cannot be reached, once a probe found that out; "" while it can.
        self.unreachable: str | None = None

    def resolve(self, repo_id: str, revision: str | None) -> str:
        """The commit of ``revision``: a commit hash as it is, else asked of the Hub, or, offline
        or when the Hub cannot be reached, from the cache's ``refs/`` (with a note)."""
        from huggingface_hub import constants
        if revision is not None and COMMIT_HASH.fullmatch(revision):
            return revision
        offline = constants.is_offline_mode() or not self.reachable(repo_id, revision)
        commit: str = self.api.resolve_revision(repo_id, revision=revision, local_files_only=offline).resolved
        if offline and not constants.is_offline_mode():
            logger.warning(f"the Hub cannot be reached ({self.unreachable}); using the cached revision "
                           f"{commit[:7]} of {repo_id}")
        return commit

    def reachable(self, repo_id: str, revision: str | None) -> bool:
        """Whether the Hub answers (any HTTP answer counts: errors are for the real request to
        report), asked once per client with :data:`PROBE_TIMEOUT` and no retries."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
        if self.unreachable is None:
            timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT)
            url = f"{constants.ENDPOINT}/api/models/{repo_id}/revision/{revision or constants.DEFAULT_REVISION}"
            try:
                # No token, no huggingface_hub headers: building them fetches its agent registry
                # first (another 3 s against a Hub that does not answer); any answer will do here.
                get_session().head(url, timeout=timeout)
                self.unreachable = ""
            except httpx2.ProxyError:
                self.unreachable = ""  # a misconfigured proxy is not a missing network: the real request says so
            except httpx2.TransportError as e:
                self.unreachable = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return not self.unreachable

    def list_files(self, repo_id: str, commit: str) -> dict[str, int] | None:
        """Top-level file name -> size at ``commit``; None when the Hub cannot be reached."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
        from huggingface_hub.hf_api import RepoFile
        if constants.is_offline_mode() or not self.reachable(repo_id, commit):
            return None
        try:
            return {f.path: f.size for f in self.api.list_repo_tree(repo_id, revision=commit)
                    if isinstance(f, RepoFile)}
        except (OfflineModeIsEnabled, httpx2.TransportError):
            return None
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code >= 500:
                return None
            raise

    def snapshot_dir(self, repo_id: str, commit: str) -> Path:
        """Where the cache keeps (or will keep) the files of ``commit``."""
        return snapshot_folder(repo_id, commit)

    def fetch(self, repo_id: str, commit: str, files: tuple[str, ...]) -> None:
        """Download exactly ``files`` of ``commit`` into the cache (cached ones are kept)."""
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(f) for f in files],
                          token=self.token)

    def read_range(self, repo_id: str, commit: str, filename: str, start: int, stop: int) -> bytes:
        """Bytes ``start..stop-1`` of a file at ``commit``, by an HTTP range request."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
        url = hf_hub_url(repo_id, filename, revision=commit)
        headers = {**build_hf_headers(token=self.token), "range": f"bytes={start}-{stop - 1}"}
        response = get_session().get(url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(response)
        return response.content[: stop - start]


def resolve_hub_source(repo_id: str, revision: str | None = None, *, download: bool = True,
                       client: HubClient | None = None, keep_raw: bool = True) -> Checkpoint:
    """The checkpoint of ``repo_id`` at ``revision`` (default: the main branch), from the cache.

    A commit whose snapshot the cache holds (config and every weight file) is read without any
    request to the Hub; a branch or tag is resolved on the Hub, or, when it cannot be reached,
    from the cache's ``refs/`` at once (:meth:`HubClient.resolve`).

    Args:
        repo_id: ``org/name`` on the Hugging Face Hub.
        revision: branch, tag or commit; the checkpoint records the commit it resolves to.
        download: fetch missing weights. False (``plan``, ``--dry-run``): read uncached shard
            headers remotely instead, so the checkpoint's paths are where the cache will hold them.
        client: a :class:`HubClient` (tests pass a fake).

    Raises:
        SourceError: the repo or revision cannot be resolved (offline and not cached, unknown,
            gated, no token), it has no safetensors weights, or they are not cached when offline.
        HeaderError: a shard header breaks the safetensors rules.

    Example:
        >>> ckpt = resolve_hub_source("mistralai/Mistral-7B-v0.1", download=False)  # doctest: +SKIP
        >>> ckpt.layout, len(ckpt.revision)                                         # doctest: +SKIP
        ('hf', 40)
    """
    where = f"{repo_id}@{revision or 'main'}"
    with _hub_errors(where):
        client = client or HubClient()
        commit = client.resolve(repo_id, revision)
        where = f"{repo_id}@{commit[:12]}"
        snapshot = client.snapshot_dir(repo_id, commit)
        found = None
        if revision is not None and COMMIT_HASH.fullmatch(revision) and snapshot.is_dir():
            try:  # a commit does not move: what the cache holds of it is the repo at that commit
                found = _assemble(client, repo_id, commit, snapshot, None, download, where, keep_raw, partial=True)
            except _PartialSnapshot:
                pass  # part of it is cached: the Hub says what the rest is
        if found is None:
            found = _assemble(client, repo_id, commit, snapshot, client.list_files(repo_id, commit), download,
                              where, keep_raw)
    reader, files = found
    return read_checkpoint(reader, files, revision=commit, repo_id=repo_id)


def hub_files(repo_id: str, files: tuple[str, ...], *, what: str, revision: str | None = None,
              client: HubClient | None = None) -> tuple[Path, str]:
    """``(snapshot folder, commit)`` of ``repo_id`` at ``revision`` (default: its main branch)
    with ``files`` in the cache:
    fetched when missing (the Hub resolves the branch; offline, or when it cannot be reached, the
    cache's ``refs/`` do). For the small files of a source that is not a checkpoint (an adapter).

    Raises:
        SourceError: not resolvable or not cached (one line, as for a checkpoint), or a file is
            not in the repo.
    """
    from huggingface_hub import constants
    where = f"{what} {repo_id}@{revision or 'main'}"
    with _hub_errors(where):
        client = client or HubClient()
        commit = client.resolve(repo_id, revision)
        snapshot = client.snapshot_dir(repo_id, commit)
        missing = _missing(snapshot, files)
        online = not constants.is_offline_mode() and client.reachable(repo_id, commit)
        if missing and online:
            client.fetch(repo_id, commit, missing)
            missing = _missing(snapshot, files)
    if missing:
        why = "not in the repo" if online else f"not in the Hugging Face cache and {_unreachable()}"
        raise SourceError(f"{what} {repo_id}@{commit[:12]}: {', '.join(missing)} {why}; give the repo of a "
                          f"peft adapter, or a local folder")
    return snapshot, commit


#: A full commit hash (what huggingface_hub accepts as a revision that needs no resolving).
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class _PartialSnapshot(Exception):
    """A cached commit's snapshot lacks its config or a weight file (internal)."""


def _assemble(client: HubClient, repo_id: str, commit: str, snapshot: Path, listing: Mapping[str, int] | None,
              download: bool, where: str, keep_raw: bool, *, partial: bool = False
              ) -> tuple[_RemoteReader, SourceFiles]:
    """The reader and files of ``commit``: from the Hub's ``listing``, or (None) from the cache's
    snapshot alone, the small files and missing weights fetched as ``download`` says.

    Raises:
        _PartialSnapshot: with ``partial``, the snapshot is not complete enough to use alone.
    """
    try:
        names = listing if listing is not None else _cached_names(snapshot, where)
        files = select_files(names, where if listing is not None else f"{where} (cached in {snapshot})")
    except SourceError:
        if partial:
            raise _PartialSnapshot() from None
        raise
    if listing is not None:  # from the cache alone, every small file it names is there already
        client.fetch(repo_id, commit, files.small)
    # The snapshot's files link into the repo's blobs/: that folder is what they must stay in.
    reader = _RemoteReader(client, repo_id, commit, snapshot, listing or {}, keep_raw=keep_raw)
    weights = files.weights
    if files.index:
        weights = tuple(sorted(set(index_weight_map(reader.json(files.index, limit=fsio.INDEX_LIMIT),
                                                    f"{where}: {files.index}").values())))
    if partial and _missing(snapshot, weights):
        raise _PartialSnapshot()
    absent = [w for w in weights if listing is not None and w not in listing]
    if absent:
        raise SourceError(f"{where}: {files.index} names shard {absent[0]!r}, which the repo does not "
                          f"have at this commit; the repo is broken, pick another revision")
    reader.remote = _fetch_weights(client, repo_id, commit, snapshot, weights, listing, download, where)
    return reader, files


class _RemoteReader(FolderReader):
    """Reads a cache snapshot; the headers of shards named in ``remote`` (not downloaded, for
    ``plan`` and ``--dry-run``) come over HTTP, at the paths the shards will have once downloaded,
    so the plan is the same."""

    def __init__(self, client: HubClient, repo_id: str, commit: str, snapshot: Path, sizes: Mapping[str, int], *,
                 keep_raw: bool = True):
        super().__init__(snapshot, inside=snapshot.parent.parent, keep_raw=keep_raw)
        self.client, self.repo_id, self.commit, self.sizes = client, repo_id, commit, sizes
        self.remote: tuple[str, ...] = ()

    def header(self, name: str) -> Header:
        if name not in self.remote:
            return super().header(name)
        return _remote_header(self.client, self.repo_id, self.commit, self.root / name, self.sizes[name])


def _fetch_weights(client: HubClient, repo_id: str, commit: str, snapshot: Path, weights: tuple[str, ...],
                   listing: Mapping[str, int] | None, download: bool, where: str) -> tuple[str, ...]:
    """Download the weights missing from the cache (``download``); returns those still missing,
    to be planned from remote headers (online, ``download=False``).

    Raises:
        SourceError: weights missing while the Hub cannot be reached, or after a download.
    """
    missing = _missing(snapshot, weights)
    if missing and download and listing is not None:
        client.fetch(repo_id, commit, missing)
        missing = _missing(snapshot, missing)
    if missing and listing is None:
        raise SourceError(f"{where}: {len(missing)} weight file(s) not in the Hugging Face cache "
                          f"({missing[0]}{', ...' if len(missing) > 1 else ''}) and {_unreachable()}; "
                          f"download them once online")
    if missing and download:
        raise SourceError(f"{where}: {missing[0]} is still missing from {snapshot} after the download; retry")
    return missing


def _missing(snapshot: Path, files: Iterable[str]) -> tuple[str, ...]:
    return tuple(f for f in files if not (snapshot / f).is_file())


def _cached_names(snapshot: Path, where: str) -> list[str]:
    if not snapshot.is_dir():
        raise SourceError(f"{where}: the cache holds no snapshot folder {snapshot} and {_unreachable()}; "
                          f"download the repo once online or pass --source PATH")
    return [p.name for p in snapshot.iterdir() if p.is_file()]


def _unreachable() -> str:
    from huggingface_hub import constants
    return "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached"


@contextmanager
def _hub_errors(where: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions (often several lines long) into one-line SourceErrors."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )
    try:
        yield
    except (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SourceError(f"{where}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          f"{_unreachable()}; download it once online, or pass --source PATH to a local "
                          f"copy") from None
    except GatedRepoError:
        raise SourceError(f"{where}: the repo is gated; accept its terms on huggingface.co and set HF_TOKEN "
                          f"(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{where}: no such model repo on the Hugging Face Hub, or it is private and no "
                          f"valid token is set (HF_TOKEN); check the name") from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: no such revision on the Hugging Face Hub; check the branch, tag or "
                          f"commit in source.revision") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"{where}: cannot resolve on the Hugging Face Hub ({reason}); retry, or pass "
                          f"--source PATH to a local copy") from None


def _remote_header(client: HubClient, repo_id: str, commit: str, path: Path, size: int) -> Header:
    first = client.read_range(repo_id, commit, path.name, 0, min(size, _FIRST_READ))
    if len(first) < 8:
        raise HeaderError(f"{path}: file is {size} bytes, too small to hold a safetensors header")
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_SIZE or 8 + n > size:
        raise HeaderError(f"{path}: header length {n} exceeds the maximum of {MAX_HEADER_SIZE} bytes or the "
                          f"file ({size} bytes); this is not a valid safetensors file")
    raw = first[8:8 + n]
    if len(raw) < n:
        raw += client.read_range(repo_id, commit, path.name, 8 + len(raw), 8 + n)
    return parse_header(path, raw, size)
