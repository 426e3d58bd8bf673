"""Packs and composed models on the Hugging Face Hub: downloads checked file by file against the manifest, access
checked with the Hub before anything is served from the cache, and uploads in one commit.

Access: when the Hub is reachable, every load of a pack repo first asks the Hub whether the token (or none) may read
it, and a refusal is a `PackAccessError` even if an earlier, authorised download left the pack in the local cache.
When the Hub cannot be reached (`HF_HUB_OFFLINE=1`, or no network), a pack in the local cache loads without any access
check: the cache is data this machine already holds, protected by its file permissions, not by a token.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    scan_cache_dir,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from transformers.utils import logging

from ..files import check_location, reading_folder, write_folder_atomically
from ..tokenization_domain_experts import DOMAIN_TOKENIZERS_FOLDER
from .cards import write_model_card
from .manifest import (
    LIBRARY_NAME,
    MANIFEST_NAME,
    README_NAME,
    PackAccessError,
    PackError,
    PackManifest,
    check_weights_header,
    library_version,
    verify_pack_files,
)


logger = logging.get_logger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@contextmanager
def hub_errors(repo_id: str, revision: str | None, token: Any, kind: str = "pack repo") -> Iterator[None]:
    """Turn `huggingface_hub` errors into messages that say what to do."""
    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except LocalEntryNotFoundError as error:
        raise OSError(
            f"Pack {repo_id}{at} is not in the Hugging Face cache, and the Hub cannot be reached (offline mode "
            f"HF_HUB_OFFLINE=1, or no network). Load it once online; later loads work offline. ({error})"
        ) from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        local = f" (and there is no local folder {repo_id!r})" if not os.path.isabs(repo_id) else ""
        raise PackAccessError(
            f"Cannot access {kind} {repo_id!r}{local}: it does not exist, or it is private and "
            + ("the token passed has no access to it" if token else "no token was passed")
            + ". Pass token=... (--token) or log in with `hf auth login`."
        ) from error
    except RevisionNotFoundError as error:
        raise PackError(f"{kind.capitalize()} {repo_id!r} has no revision {revision!r}.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PackAccessError(
                f"The Hub refused access to {repo_id!r} (HTTP {status}: {error.server_message or error}): the token "
                "is invalid or has no access to this repo. Pass a valid token=... (--token) or log in with "
                "`hf auth login`."
            ) from error
        raise


def check_access(repo_id: str, revision: str | None, token: str | bool | None, kind: str = "pack repo") -> bool:
    """Ask the Hub whether `token` may read `repo_id` at `revision`; a refusal raises `PackAccessError`.

    Returns False, without raising, when the Hub cannot be reached (offline mode, no network): the caller then serves
    what the local cache holds (see the module docstring).
    """
    if constants.HF_HUB_OFFLINE:
        return False
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=library_version())
    try:
        with hub_errors(repo_id, revision, token, kind):
            api.model_info(repo_id, revision=revision)
    except (OfflineModeIsEnabled, httpx2.TransportError) as error:
        logger.warning(f"The Hub cannot be reached ({type(error).__name__}); {repo_id} is read from the local cache "
                       "without an access check.")
        return False
    return True


def evict_from_cache(repo_id: str, snapshot_paths: list[str], cache_dir: str | os.PathLike | None) -> None:
    """Remove files from the Hugging Face cache: every cached revision of `repo_id` that holds one of their blobs.

    `huggingface_hub` checks only the size of a download, so a corrupted file of the right size lands in the cache and
    would be served again by every later call (offline or pinned ones too). Deleting the revisions that point to the bad
    blobs (through the public cache API) makes the next call download them again.
    """
    bad_blobs = {Path(os.path.realpath(path)) for path in snapshot_paths}
    cache = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    revisions = [
        revision.commit_hash
        for repo in cache.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for revision in repo.revisions
        if any(file.blob_path in bad_blobs for file in revision.files)
    ]
    if revisions:
        cache.delete_revisions(*revisions).execute()
        logger.warning(f"Removed cached revision(s) {', '.join(r[:7] for r in revisions)} of {repo_id}: corrupted files.")


def _source_name(repo_id: str | None, revision: str | None, folder: Path) -> str:
    if repo_id is None:
        return str(folder)
    return f"{repo_id}@{revision[:7]}" if revision else repo_id


@dataclass
class FetchedPack:
    """A pack's manifest, and how to get the rest of it (from a local folder, or from the Hub at one commit)."""

    manifest: PackManifest
    folder: Path
    repo_id: str | None = None
    commit: str | None = None
    hub_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return _source_name(self.repo_id, self.commit, self.folder)

    def fetch_files(self) -> Path:
        """Make every file of the manifest present in `folder` and check it; returns `folder`."""
        if self.repo_id is not None:
            paths = []
            with hub_errors(self.repo_id, self.commit, self.hub_kwargs.get("token")):
                for path in self.manifest.files:
                    try:
                        paths.append(hf_hub_download(self.repo_id, path, revision=self.commit, **self.hub_kwargs))
                    except EntryNotFoundError as error:
                        if isinstance(error, LocalEntryNotFoundError):
                            raise
                        raise PackError(f"{self.source}: its manifest lists {path}, which the repo does not hold.") from error
            bad = verify_pack_files(self.folder, self.manifest)
            if bad:
                evict_from_cache(self.repo_id, [p for p, name in zip(paths, self.manifest.files) if name in bad],
                                 self.hub_kwargs.get("cache_dir"))
                raise PackError(
                    f"{self.source}: the download of {', '.join(bad)} does not match the sha256 in the pack's manifest "
                    "(corrupted in transit or in storage). The bad files were removed from the Hugging Face cache; "
                    "try again."
                )
        else:
            bad = verify_pack_files(self.folder, self.manifest)
            if bad:
                raise PackError(
                    f"{self.source}: {', '.join(bad)} differ from the size or sha256 in its manifest (missing, "
                    "modified or corrupted files)."
                )
        check_weights_header(self.folder, self.manifest, self.source)
        return self.folder


def is_local(source: str | os.PathLike) -> bool:
    """Whether `source` is a local pack folder rather than a Hub repo id; a file, a missing folder (a path that cannot
    be a repo id) or a malformed repo id is an error."""
    location = check_location(str(source), role="pack")
    path = Path(location).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        raise PackError(f"{source} is a file; a pack is a folder (holding {MANIFEST_NAME}) or a Hub repo id.")
    try:
        validate_repo_id(location)
    except HFValidationError as error:
        raise FileNotFoundError(f"No such pack folder: {source} (nor is it a Hub repo id: {error}).") from error
    return False


def fetch_manifest(
    source: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> FetchedPack:
    """Read and validate the manifest of a pack folder or Hub repo (checking access with the Hub first)."""
    if is_local(source):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {source} is a local folder.")
        return FetchedPack(PackManifest.from_folder(source), Path(source))
    repo_id = str(source)
    if not local_files_only:
        check_access(repo_id, revision, token)
    hub_kwargs = {"token": token, "cache_dir": cache_dir, "force_download": force_download,
                  "local_files_only": local_files_only, "library_name": LIBRARY_NAME,
                  "library_version": library_version()}
    with hub_errors(repo_id, revision, token):
        try:
            path = hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, **hub_kwargs)
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):
                raise
            at = f" at revision {revision!r}" if revision else ""
            raise PackError(f"{repo_id}{at} is not a domain pack: it has no {MANIFEST_NAME}.") from error
    folder = Path(path).parent
    commit = folder.name if _COMMIT.match(folder.name) else revision
    try:
        manifest = PackManifest.from_folder(folder)
    except PackError:
        # Most likely a corrupted download (the Hub client checks sizes only): never serve it from the cache again.
        evict_from_cache(repo_id, [path], cache_dir)
        raise
    return FetchedPack(manifest, folder, repo_id, commit, hub_kwargs)


def read_pack_manifest(
    source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None, **hub_kwargs
) -> PackManifest:
    """The manifest of a pack folder or Hub repo (downloads only `domain_pack.json`)."""
    return fetch_manifest(source, revision=revision, token=token, **hub_kwargs).manifest


def is_pack(source: str | os.PathLike, revision: str | None = None, token: str | bool | None = None) -> bool:
    """Whether `source` (a folder or a Hub repo) holds a domain pack manifest."""
    if Path(source).exists():
        return (Path(source) / MANIFEST_NAME).is_file()
    if is_local(source):  # raises for a path that does not exist
        return False
    with hub_errors(str(source), revision, token, kind="repo"):
        try:
            hf_hub_download(str(source), MANIFEST_NAME, revision=revision, token=token)
        except EntryNotFoundError:  # a model repo, or (offline) a repo whose manifest is not in the cache
            return False
    return True


def download_pack(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """Download a pack into the Hugging Face cache, check every file against its manifest, and return its folder.

    Files are fetched at one commit (the one `revision` resolves to when the manifest is read), so a push in between
    never mixes two versions. Offline mode (`HF_HUB_OFFLINE=1`) reads from the cache. A file whose sha256 differs from
    the manifest is removed from the cache and raises `PackError`.
    """
    return fetch_manifest(repo_id, revision, token, cache_dir, force_download, local_files_only).fetch_files()


def pull_pack(
    repo_id: str,
    save_directory: str | os.PathLike,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = True,
) -> Path:
    """Download and check a pack (see `download_pack`), then copy it to the folder `save_directory`, with its card."""
    fetched = fetch_manifest(repo_id, revision, token, cache_dir)
    folder = fetched.fetch_files()
    readme = None
    try:
        readme = hf_hub_download(repo_id, README_NAME, revision=fetched.commit, **fetched.hub_kwargs)
    except (EntryNotFoundError, HfHubHTTPError):
        logger.info(f"{fetched.source} has no {README_NAME}.")

    def write(target: Path) -> None:
        for path in [MANIFEST_NAME, *fetched.manifest.files]:
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / path, target / path)
        if readme is not None:
            shutil.copyfile(readme, target / README_NAME)

    return write_folder_atomically(save_directory, write, replaceable=MANIFEST_NAME, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _push_errors(repo_id: str, token: Any) -> Iterator[None]:
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise PackAccessError(
                f"Pushing to {repo_id!r} needs a valid write token ("
                + ("the one passed was refused" if token else "none was passed")
                + "): pass token=... (--token) or log in with `hf auth login`."
            ) from error
        if status == 403:
            raise PackAccessError(f"The token's user may not write to {repo_id!r} (HTTP 403): push to your own "
                                  "namespace or ask for write access.") from error
        raise


def upload_in_one_commit(folder: Path, repo_id: str, *, token, private, revision, commit_message, commit_description,
                         create_pr, delete_patterns: list[str]) -> CommitInfo:
    """Upload every file of `folder` to `repo_id` (created if needed) in ONE commit, which also deletes the repo's files
    that match `delete_patterns` and are not in `folder` (stale files of an earlier push).

    `create_commit`, not `upload_folder`: with `hf_xet` installed, `upload_folder` may split a large folder into several
    commits, and a push that fails half-way would leave half a pack.
    """
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=library_version())
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    with _push_errors(repo_id, token):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=None if create_pr else revision)
        remote = [sibling.rfilename for sibling in head.siblings or []]
        stale = [path for path in filter_repo_objects(remote, allow_patterns=delete_patterns)
                 if path not in files and path != ".gitattributes"]
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file)) for path, file in files.items()]
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        return api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision, create_pr=create_pr,
                                 parent_commit=None if create_pr else head.sha)


def push_pack_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload a pack folder to `repo_id` (created if needed) in one commit, after checking it against its manifest.

    The commit replaces the repo's files (but `.gitattributes`), so that no file of an earlier version lingers. Only the
    files the manifest lists (and the model card) are uploaded.
    """
    with reading_folder(folder) as folder:
        manifest = PackManifest.from_folder(folder)
        FetchedPack(manifest, folder).fetch_files()  # refuses a modified or incomplete folder
        with tempfile.TemporaryDirectory(prefix="domain-pack-") as staging:
            for path in [MANIFEST_NAME, README_NAME, *manifest.files]:
                if (folder / path).is_file():
                    (Path(staging) / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(folder / path, Path(staging) / path)
            commit = upload_in_one_commit(
                Path(staging), repo_id, token=token, private=private, revision=revision,
                commit_message=commit_message or f"Upload domain pack {manifest.name}",
                commit_description=commit_description, create_pr=create_pr, delete_patterns=["*"])
    logger.info(f"Pushed pack {manifest.name!r} to {repo_id}: {commit.commit_url}")
    return commit


def push_model_to_hub(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a composed model (`DomainExpertsForCausalLM`) in one commit: config (with `auto_map`), safetensors
    weights, the remote-code files, the tokenizer and domain tokenizers (`save_pretrained`), and a model card listing
    the domains and their packs.

    Earlier weights shards and domain tokenizers of the repo are deleted in the same commit; other files stay.
    """
    with tempfile.TemporaryDirectory(prefix="domain-experts-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        write_model_card(model, tmp, repo_id=repo_id, tags=tags)
        commit = upload_in_one_commit(
            Path(tmp), repo_id, token=token, private=private, revision=revision,
            commit_message=commit_message or "Upload DomainExperts model", commit_description=commit_description,
            create_pr=create_pr,
            delete_patterns=["*.safetensors", "*.safetensors.index.json", f"{DOMAIN_TOKENIZERS_FOLDER}/*"])
    logger.info(f"Pushed the model to {repo_id}: {commit.commit_url}")
    return commit


__all__ = [
    "check_access",
    "download_pack",
    "is_pack",
    "pull_pack",
    "push_model_to_hub",
    "push_pack_folder",
    "read_pack_manifest",
]
