"""The file chores every part of the library shares: writing files and folders whole or not at all, and reading the
text data sets a user points us at.

- `write_file_atomically` / `write_folder_atomically`: the content is written beside the target and renamed into place,
  so a crash or a kill leaves either the previous version or the new one, never half of one. A folder replacing another
  is swapped under an exclusive lock; readers that take `reading_folder` see one whole version. A folder that holds
  anything but what we write there is never replaced or deleted.
- `read_text_file`: a json/jsonl/csv/parquet/txt file as a `datasets.Dataset`, with one clear error (naming the file,
  the row where known, and the fix) for every way such a file can be wrong; `read_json_file` the same for the small
  JSON files we write ourselves (run configs, manifests).
- `file_sha256` / `folder_manifest` / `verify_folder_manifest`: what a folder held when it was written, to tell later
  whether any of its files changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


TEXT_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
"""File suffix -> the `datasets` builder that reads it."""

_PARTIAL = ".partial"
_OLD = ".old"
# How long a reader waits for a writer to finish swapping a folder before it reports the folder as being written.
_LOCK_TIMEOUT_SECONDS = 60.0


class DataFileError(ValueError):
    """A file we were pointed at that cannot be read (text rows, a run's config, a checkpoint): the message names the
    file, the row or line where known, and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_file_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file beside it, flushed to disk and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_PARTIAL}")
    try:
        with open(partial, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _lock_path(folder: Path) -> Path:
    """The lock file of `folder`'s writers and readers: in the system's temporary folder (keyed by the folder's real
    path), so that nothing is left beside the user's folders and read-only locations can be locked too."""
    key = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:32]
    locks = Path(tempfile.gettempdir()) / "domain_experts-locks"
    locks.mkdir(exist_ok=True)
    return locks / f"{key}.lock"


def _leftovers(folder: Path) -> list[Path]:
    """Staging and swapped-out folders that an earlier, killed write of `folder` left beside it."""
    pattern = f".{folder.name}.*"
    return [p for p in folder.parent.glob(pattern) if p.is_dir() and p.name.endswith((_PARTIAL, _OLD))]


def write_folder_atomically(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    replaceable: str | tuple[str, ...],
    overwrite: bool = True,
) -> Path:
    """Run `write` on a fresh staging folder beside `target`, then rename it to `target` (see `writing_folder`).

    Returns:
        `target`, as a `Path`.
    """
    with writing_folder(target, replaceable, overwrite) as staging:
        write(staging)
    return Path(target)


@contextmanager
def writing_folder(
    target: str | os.PathLike, replaceable: str | tuple[str, ...], overwrite: bool = True
) -> Iterator[Path]:
    """Yield a fresh staging folder beside `target`; when the block ends without an error, rename it to `target`.

    An existing `target` is replaced only if it is empty or holds one of the `replaceable` files (a pack's manifest, a
    saved model's config): a folder of other files is never replaced or deleted. With `overwrite=False` an existing
    non-empty `target` is an error. Writers of the same `target` are serialised by a lock file (`_lock_path`), and the
    old version is removed only once the new one is in place; staging folders left by a killed writer are removed first.
    If the block raises, the staging folder is removed and `target` is left as it was.

    The staging folder may be filled by other processes too (say, every process of a distributed job saving its part
    of a checkpoint), as long as they have finished when the block ends.
    """
    target = Path(target)
    replaceable = (replaceable,) if isinstance(replaceable, str) else tuple(replaceable)
    check_replaceable(target, replaceable, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(_lock_path(target))):
        for leftover in _leftovers(target):
            shutil.rmtree(leftover, ignore_errors=True)
        # Checked again under the lock: another writer may have put something there meanwhile.
        check_replaceable(target, replaceable, overwrite)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_PARTIAL}")
        staging.mkdir()
        try:
            yield staging
            if target.exists():
                old = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_OLD}")
                target.rename(old)
                try:
                    staging.rename(target)
                except BaseException:
                    old.rename(target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def remove_folder(target: str | os.PathLike, replaceable: str | tuple[str, ...]) -> None:
    """Delete `target`, a folder written by `write_folder_atomically` (it holds one of `replaceable`).

    A folder that holds none of `replaceable` (not ours) is a `FileExistsError` and stays as it is.
    """
    target = Path(target)
    replaceable = (replaceable,) if isinstance(replaceable, str) else tuple(replaceable)
    if not target.exists():
        return
    check_replaceable(target, replaceable)
    with FileLock(str(_lock_path(target))):
        shutil.rmtree(target)
        for leftover in _leftovers(target):
            shutil.rmtree(leftover, ignore_errors=True)


def check_replaceable(target: Path, replaceable: tuple[str, ...], overwrite: bool = True) -> None:
    """Raise unless `write_folder_atomically` may put a folder at `target` (see there)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output folder.")
    if not any(target.iterdir()):
        return
    if not any((target / name).is_file() for name in replaceable):
        raise FileExistsError(
            f"{target} is not empty and holds no {' or '.join(replaceable)}: refusing to write over a folder this "
            "library did not write. Choose another output folder, or empty this one."
        )
    if not overwrite:
        raise FileExistsError(f"{target} already holds a saved result; pass --overwrite (overwrite=True) to replace "
                              "it.")


@contextmanager
def reading_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold off writers of `folder` (see `write_folder_atomically`) while the caller reads it, so it reads one version.

    Also removes what a killed writer left beside the folder.
    """
    folder = Path(folder)
    lock_path = _lock_path(folder)
    lock = FileLock(str(lock_path), timeout=_LOCK_TIMEOUT_SECONDS)
    try:
        lock.acquire()
    except Timeout as error:
        raise OSError(f"{folder} is being written by another process; retry once it has finished.") from error
    try:
        for leftover in _leftovers(folder):
            shutil.rmtree(leftover, ignore_errors=True)
        yield folder
    finally:
        lock.release()


@contextmanager
def working_in_folder(folder: str | os.PathLike, work: str) -> Iterator[Path]:
    """Hold `folder` for one long piece of `work` (a training run) that writes into it over time: a second process
    wanting the same folder gets an `OSError` at once instead of mixing its files with the first one's."""
    folder = Path(folder)
    lock = FileLock(str(_lock_path(folder.parent / f"{folder.name}.work")), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OSError(f"{folder} is in use by another process ({work}): wait for it to finish, or choose another "
                      "folder.") from None
    try:
        yield folder
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# Reading what we wrote, and checking it is still what we wrote
# ----------------------------------------------------------------------------------------------------------------


def check_location(location: str, role: str = "model") -> str:
    """`location` as given, unless it can only be a local path and nothing is there: then a `FileNotFoundError`; or
    it is a file: then a `NotADirectoryError`.

    A Hub repo id is `NAME` or `NAMESPACE/NAME`; a location that starts with `.`, `/` or `~`, or holds more than one
    `/`, can only be a local folder, and a missing one is reported as such (not as a malformed repo id).
    """
    path = Path(location).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"{location} is a file: give a {role} folder or a Hub repo id.")
    if path.exists():
        return location
    if location.startswith((".", "/", "~")) or location.count("/") > 1 or (os.sep != "/" and os.sep in location):
        raise FileNotFoundError(f"No such {role} folder: {location}")
    return location


def read_json_file(path: str | os.PathLike, role: str, fix: str) -> dict:
    """The JSON object in `path`; a missing, unreadable or damaged file is one clear error naming `role`, the file and
    `fix` (what the user can do about it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {role} at {path}: {fix}")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataFileError(f"The {role} {path} is damaged (not UTF-8 text, byte {error.start}): {fix}") from None
    except json.JSONDecodeError as error:
        raise DataFileError(f"The {role} {path} is damaged (not JSON: {error.msg}, line {error.lineno} column "
                            f"{error.colno}): {fix}") from None
    if not isinstance(value, dict):
        raise DataFileError(f"The {role} {path} is damaged (a JSON {type(value).__name__}, not an object): {fix}")
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """`{relative path: {"size": bytes, "sha256": hex}}` of every file under `folder`, but the top-level names in
    `exclude`."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in exclude
    }


def verify_folder_manifest(folder: str | os.PathLike, manifest: dict[str, dict]) -> list[str]:
    """What differs between `folder` and the `manifest` written with it: one line per missing, resized or changed file
    (empty when every file is as it was written). Files the manifest does not list are not checked."""
    folder = Path(folder)
    problems = []
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not the {expected['size']} written (truncated?)")
        elif file_sha256(path) != expected["sha256"]:
            problems.append(f"{name} does not match the sha256 written with it (changed or damaged on disk)")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Reading text data
# ----------------------------------------------------------------------------------------------------------------


def _first_bad_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """The first line of a .jsonl file that is not a JSON object, with what it is instead; `(0, "blank")` for a file of
    no row at all."""
    rows = 0
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return number, f"not JSON ({error.msg})"
            if not isinstance(row, dict):
                return number, f"a JSON {type(row).__name__}, not an object"
            rows += 1
    return None if rows else (0, "blank")


def read_text_file(path: str | os.PathLike, column: str | None = "text", role: str = "data file"):
    """Read a json/jsonl/csv/parquet/txt file as a `datasets.Dataset` whose `column` holds text.

    A `.txt` file gives one row per line in column `text`. Every problem is a `DataFileError` (or `FileNotFoundError`)
    naming `role` and the file, the row where known, and the fix: a missing or empty file, an unknown suffix, bytes that
    are not UTF-8, a line that is not a JSON object, a missing column, a value that is not a string.

    Args:
        path: the file.
        column: the column that must hold the text; `None` reads rows of any columns (the caller checks them).
        role: what the file is to the caller, for messages ("training file", "validation file", ...).
    """
    import datasets

    path = Path(path)
    builder = TEXT_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataFileError(f"Cannot read {role} {path}: use a {', '.join(TEXT_FILE_BUILDERS)} file.")
    if not path.exists():
        raise FileNotFoundError(f"Cannot read the {role} {path}: no such file.")
    if not path.is_file():
        raise DataFileError(f"Cannot read the {role} {path}: it is not a file.")
    if path.stat().st_size == 0:
        raise DataFileError(f"The {role} {path} is empty (0 bytes): give a file with at least one row of text.")
    if builder in ("json", "text", "csv"):
        bad_line = _first_bad_utf8_line(path)
        if bad_line is not None:
            raise DataFileError(f"The {role} {path} is not UTF-8 text (line {bad_line}): convert it to UTF-8 "
                                "(e.g. `iconv -t utf-8`).")
    if path.suffix.lower() == ".jsonl":
        bad = _first_bad_json_line(path)
        if bad == (0, "blank"):
            raise DataFileError(f"The {role} {path} holds only blank lines: give a file with at least one row of text.")
        if bad is not None:
            raise DataFileError(f"Line {bad[0]} of the {role} {path} is {bad[1]}: a .jsonl file holds one JSON object "
                                "per line.")
    if builder == "text" and column not in (None, "text"):
        raise DataFileError(f"The {role} {path} is plain text, whose rows are in column 'text', not {column!r}: "
                            "drop the column setting or use a json/csv file.")
    # datasets' own bar would say "Generating train split" of any file, a validation file included.
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # noqa: BLE001  (datasets wraps parser errors in its own generation errors)
        cause = error.__cause__ or error
        raise DataFileError(f"Cannot read the {role} {path} as {builder}: {cause}. Check the file's format.") from None
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    if len(rows) == 0:
        raise DataFileError(f"The {role} {path} holds no rows.")
    if column is None:
        return rows
    if column not in rows.column_names:
        raise DataFileError(f"The {role} {path} has no column {column!r}; its columns are {rows.column_names}. "
                            "Name the text column (--text-column) or rename it in the file.")
    feature = rows.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        for number, value in enumerate(rows[column], start=1):
            if value is not None and not isinstance(value, str):
                raise DataFileError(f"Row {number} of the {role} {path} holds {value!r} ({type(value).__name__}) in "
                                    f"column {column!r}, not text: every value of the text column must be a string.")
    return rows


__all__ = [
    "TEXT_FILE_BUILDERS",
    "DataFileError",
    "check_location",
    "check_replaceable",
    "file_sha256",
    "folder_manifest",
    "read_json_file",
    "read_text_file",
    "reading_folder",
    "remove_folder",
    "verify_folder_manifest",
    "working_in_folder",
    "write_file_atomically",
    "write_folder_atomically",
    "writing_folder",
]
