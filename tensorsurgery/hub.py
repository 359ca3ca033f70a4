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
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from .errors import HeaderError, SourceError
from .format import MAX_HEADER_SIZE, Header, parse_header, read_header
from .source import (INDEX_NAME, SINGLE_NAME, Checkpoint, _check_layer_count, _check_shard_name, _owners,
                     _read_json, load_checkpoint)

_NATIVE_WEIGHTS = re.compile(r"consolidated(\.\d+)?\.safetensors")
#: Small files copied into the output: tokenizer (HF, sentencepiece, tiktoken, Mistral's tekken)
#: and generation settings.
COPIED_FILES = re.compile(r"tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json"
                          r"|generation_config\.json|vocab\.(json|txt)|merges\.txt"
                          r"|chat_template\.(json|jinja)|tekken\.json|[^/]*\.tiktoken")
CARD_NAME = "README.md"
#: First range read of a remote header; most headers fit (HfApi reads 100 kB for the same reason).
_FIRST_READ = 100_000
_SHA256_BLOB = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class HubFiles:
    """The files of one repo revision that a plan needs, in one weight format.

    ``small`` are fetched even by ``plan``; ``weights`` is empty for an indexed Hugging Face repo
    until its index (one of ``small``) is read, see :func:`index_shards`.
    """

    layout: str
    small: tuple[str, ...]
    weights: tuple[str, ...]


def select_files(names: Iterable[str], where: str) -> HubFiles:
    """Pick one weight format from the top-level file ``names`` of a repo (pure).

    Hugging Face shards win over ``consolidated*.safetensors``: they need no key renaming and no
    rotary permutation, and ``load_checkpoint`` prefers them the same way.

    Raises:
        SourceError: no safetensors weights, or the config of the chosen format is missing.
    """
    names = set(names)
    extras = sorted(n for n in names if COPIED_FILES.fullmatch(n)) + ([CARD_NAME] if CARD_NAME in names else [])
    if INDEX_NAME in names or SINGLE_NAME in names:
        layout, config, weights = "hf", "config.json", () if INDEX_NAME in names else (SINGLE_NAME,)
        small = [INDEX_NAME] if INDEX_NAME in names else []
    elif any(_NATIVE_WEIGHTS.fullmatch(n) for n in names):
        layout, config, small = "mistral", "params.json", []
        weights = tuple(sorted(n for n in names if _NATIVE_WEIGHTS.fullmatch(n)))
    else:
        raise SourceError(f"{where}: no {SINGLE_NAME}, {INDEX_NAME} or consolidated.safetensors; only "
                          f"safetensors checkpoints are supported")
    if config not in names:
        raise SourceError(f"{where}: has {layout} weights but no {config}; a checkpoint needs it")
    return HubFiles(layout, tuple([config, *small, *extras]), weights)


def index_shards(index_path: Path) -> tuple[str, ...]:
    """The shard files named by the ``weight_map`` of ``model.safetensors.index.json``.

    Raises:
        SourceError: unreadable index, no weight_map, or a shard name that is not a plain
            ``*.safetensors`` file name (it becomes a download path).
    """
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: no weight_map; the repo's index is broken")
    for name, shard in weight_map.items():
        _check_shard_name(index_path, name, shard)
    return tuple(sorted(set(weight_map.values())))


def cached_sha256(path: str | Path) -> str | None:
    """The sha256 of a file in the Hugging Face cache, without reading it, or None.

    The cache stores an LFS file (every safetensors shard) as ``blobs/<sha256>`` and the snapshot
    holds a symlink to it. Small files are stored under their 40-hex git blob id, and caches
    without symlinks (Windows) hold copies: both give None, so hash those yourself.
    """
    path = Path(path)
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_BLOB.fullmatch(target.name) and target.is_file():
        return target.name
    return None


class HubClient:
    """The few Hub operations a source needs, over huggingface_hub. Tests pass a fake with the
    same methods; the token is the library's default (``HF_TOKEN`` or ``hf auth login``)."""

    def __init__(self, token: str | None = None):
        from huggingface_hub import HfApi
        self.token = token
        self.api = HfApi(token=token)

    def resolve(self, repo_id: str, revision: str | None) -> str:
        """The commit of ``revision``; offline, from the cache's ``refs/``."""
        from huggingface_hub import constants
        return self.api.resolve_revision(repo_id, revision=revision,
                                         local_files_only=constants.is_offline_mode()).resolved

    def list_files(self, repo_id: str, commit: str) -> dict[str, int] | None:
        """Top-level file name -> size at ``commit``; None when the Hub cannot be reached."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
        from huggingface_hub.hf_api import RepoFile
        if constants.is_offline_mode():
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
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
        return (Path(constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")
                / "snapshots" / commit)

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
                       client: HubClient | None = None) -> Checkpoint:
    """The checkpoint of ``repo_id`` at ``revision`` (default: the main branch), from the cache.

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
        listing = client.list_files(repo_id, commit)
        names = listing if listing is not None else _cached_names(snapshot, where)
        files = select_files(names, where if listing is not None else f"{where} (cached in {snapshot})")
        client.fetch(repo_id, commit, files.small)
        weights = files.weights or index_shards(snapshot / INDEX_NAME)
        absent = [w for w in weights if listing is not None and w not in listing]
        if absent:
            raise SourceError(f"{where}: {INDEX_NAME} names shard {absent[0]!r}, which the repo does not "
                              f"have at this commit; the repo is broken, pick another revision")
        if _fetch_weights(client, repo_id, commit, snapshot, weights, listing, download, where):
            return _remote_checkpoint(client, repo_id, commit, snapshot, files, weights, listing)
    ckpt = load_checkpoint(snapshot, revision=commit, repo_id=repo_id)
    return replace(ckpt, extra_files=tuple(f for f in ckpt.extra_files if f in files.small))


def _fetch_weights(client: HubClient, repo_id: str, commit: str, snapshot: Path, weights: tuple[str, ...],
                   listing: Mapping[str, int] | None, download: bool, where: str) -> bool:
    """Download the weights missing from the cache (``download``); True when some are still
    missing and may be planned from remote headers (online, ``download=False``).

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
    return bool(missing)


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
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
                                        RevisionResolutionError)
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


def _remote_checkpoint(client: HubClient, repo_id: str, commit: str, snapshot: Path, files: HubFiles,
                       weights: tuple[str, ...], sizes: Mapping[str, int]) -> Checkpoint:
    """A checkpoint whose uncached shard headers were read remotely; its paths are the snapshot
    paths the weights will have once downloaded (the same headers, so the same plan)."""
    headers = {w: read_header(snapshot / w) if (snapshot / w).is_file()
               else _remote_header(client, repo_id, commit, snapshot / w, sizes[w]) for w in weights}
    owners = _owners(headers)
    if files.layout == "hf":
        config = _read_json(snapshot / "config.json")
        weight_map = (_read_json(snapshot / INDEX_NAME)["weight_map"] if INDEX_NAME in files.small
                      else {n: s[0] for n, s in owners.items()})
    else:  # as load_checkpoint does for this layout (keep the two in step)
        from .native import config_from_params
        weight_map = {n: s[0] for n, s in owners.items()}
        config = config_from_params(_read_json(snapshot / "params.json"), snapshot / "params.json",
                                    {n: headers[s].tensors[n] for n, s in weight_map.items()})
    _check_weight_map(snapshot, weight_map, owners)
    ckpt = Checkpoint(root=snapshot, layout=files.layout, headers=MappingProxyType(headers),
                      weight_map=MappingProxyType(dict(weight_map)), config=MappingProxyType(config),
                      extra_files=tuple(f for f in files.small if COPIED_FILES.fullmatch(f)),
                      revision=commit, repo_id=repo_id)
    _check_layer_count(ckpt)
    return ckpt


def _check_weight_map(snapshot: Path, weight_map: Mapping[str, str], owners: Mapping[str, list[str]]) -> None:
    """The checks ``load_checkpoint`` makes of an index against its shards."""
    for name, shards in owners.items():
        if len(shards) > 1:
            raise SourceError(f"{snapshot}: tensor {name!r} is in two shards ({shards[0]} and {shards[1]}); "
                              f"the checkpoint is inconsistent")
        if weight_map.get(name) != shards[0]:
            raise SourceError(f"{snapshot / INDEX_NAME}: tensor {name!r} in {shards[0]} is not mapped to it "
                              f"in the weight_map; the index and shards are from different versions")
    for name, shard in weight_map.items():
        if name not in owners:
            raise SourceError(f"{snapshot / INDEX_NAME}: tensor {name!r} is listed in {shard} but that shard "
                              f"does not hold it; the index and shards are from different versions")


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
