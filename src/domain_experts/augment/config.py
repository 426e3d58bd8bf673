"""The two settings objects of an augmentation run: what to generate (`AugmentConfig`) and what to keep
(`QualityConfig`). Both are plain dataclasses that round-trip through JSON, so a run is described by two small files
saved next to its output."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..files import read_json_file, write_file_atomically
from .prompts import DEFAULT_TEMPLATES, STRATEGIES, check_template


_Config = TypeVar("_Config", bound="_JsonConfig")


class _JsonConfig:
    """`to_dict` / `from_dict` / `to_json_file` / `from_json_file` for a flat dataclass of JSON values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], values: dict[str, Any]) -> _Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    def to_json_file(self, path: str | os.PathLike) -> None:
        write_file_atomically(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls: type[_Config], path: str | os.PathLike) -> _Config:
        return cls.from_dict(read_json_file(path, f"{cls.__name__} file", f"give a JSON object of {cls.__name__} "
                                            "fields (e.g. the one an earlier run saved)."))


@dataclass
class AugmentConfig(_JsonConfig):
    r"""
    What an augmentation run generates, and how.

    Args:
        task (`str`, *optional*):
            `"qa"` (rows of question, answer label, optional explanation and context) or `"text"` (rows of one text
            column). `None` picks `"qa"` when the source has `question_column`, else `"text"` when it has
            `text_column`.
        strategies (`list[str]`, *optional*):
            Which strategies run. For QA: `"rewrite"` (paraphrase the question, rewrite the explanation, keep the
            label) and `"new_pairs"` (write new pairs from few-shot seed examples); for text: `"paraphrase"`.
            `None` runs every strategy of the task.
        rewrites_per_row (`int`): how many rewrites (or paraphrases) are asked for each source row.
        num_new_pairs (`int`, *optional*): how many new pairs `"new_pairs"` asks for; `None` means one per source row.
        num_shots (`int`): how many seed examples each `"new_pairs"` prompt shows.
        labels (`list[str]`, *optional*):
            The allowed answers of a QA task. `None` means the distinct answers of the source rows. `"new_pairs"`
            asks for each label in turn and drops a pair that answers otherwise, so the new pairs stay balanced.
        templates (`dict[str, str]`, *optional*):
            Prompt templates replacing the defaults of `DEFAULT_TEMPLATES`, keyed by strategy. They are
            `str.format` strings; see `TEMPLATE_FIELDS` for the fields each strategy fills in.
        question_column, answer_column, explanation_column, context_column, text_column (`str`):
            Column names of the source dataset. The explanation and context columns are optional in the data.
        max_new_tokens (`int`), temperature (`float`), top_p (`float`):
            Sampling settings of every generation; `temperature=0` is greedy decoding.
        system_prompt (`str`, *optional*): a system message put before every prompt (chat generators only).
        seed (`int`):
            The seed of the run. Every generation gets its own seed derived from it and from what the generation is
            for, so a row comes out the same however the work is batched, resumed or spread over workers.
    """

    task: str | None = None
    strategies: list[str] | None = None
    rewrites_per_row: int = 1
    num_new_pairs: int | None = None
    num_shots: int = 3
    labels: list[str] | None = None
    templates: dict[str, str] = field(default_factory=dict)
    question_column: str = "question"
    answer_column: str = "answer"
    explanation_column: str = "explanation"
    context_column: str = "context"
    text_column: str = "text"
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    system_prompt: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.task not in (None, "qa", "text"):
            raise ValueError(f"task must be 'qa', 'text' or None (detect from the columns), not {self.task!r}.")
        if self.strategies is not None:
            unknown = sorted(set(self.strategies) - set(STRATEGIES))
            if unknown or not self.strategies:
                raise ValueError(f"Unknown strategies {unknown or self.strategies}; choose from {sorted(STRATEGIES)}.")
            tasks = {STRATEGIES[name] for name in self.strategies}
            if self.task is not None and tasks != {self.task}:
                raise ValueError(f"Strategies {self.strategies} do not all belong to task {self.task!r}.")
            if len(tasks) > 1:
                raise ValueError(f"Strategies {self.strategies} mix QA and text strategies; run them separately.")
        for strategy, template in self.templates.items():
            if strategy not in STRATEGIES:
                raise ValueError(f"A template for unknown strategy {strategy!r}; choose from {sorted(STRATEGIES)}.")
            check_template(strategy, template)
        for name in ("rewrites_per_row", "num_shots", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}.")
        if self.num_new_pairs is not None and self.num_new_pairs < 0:
            raise ValueError(f"num_new_pairs must be >= 0, not {self.num_new_pairs}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Need temperature >= 0 and 0 < top_p <= 1, not {self.temperature} and {self.top_p}.")
        if self.labels is not None and len(set(self.labels)) < 2:
            raise ValueError(f"labels must hold at least two distinct answers, not {self.labels}.")

    def template(self, strategy: str) -> str:
        """The prompt template of `strategy`: the replacement given in `templates`, else the default."""
        return self.templates.get(strategy, DEFAULT_TEMPLATES[strategy])


@dataclass
class QualityConfig(_JsonConfig):
    r"""
    What an augmentation run keeps. Generations pass the checks in this order, and the first that fails names the
    reason a row is dropped: unparseable output, a label outside the allowed set (or, for a rewrite, other than its
    source row's; for a new pair, other than the one its prompt asked for), too short or too long, overlap with the
    evaluation split, a reference-model score under the threshold, an exact or a near duplicate of a source row or of
    a row kept earlier. (Scoring comes before deduplication so that a row dropped for its score never stands in the way
    of a duplicate of it that scores well.)

    Args:
        min_words (`int`): fewest words in a row's main text (the question with its context, or the text).
        max_words (`int`, *optional*): most words in a row's main text; `None` means twice the longest source row.
        near_duplicate_threshold (`float`):
            A row whose main text has a character n-gram Jaccard similarity at least this high with a source row or
            with a row kept earlier is a near duplicate. Paraphrases are meant to differ in wording: one that changes
            a word or two, or only reorders the question, adds nothing. This catches overlap of wording, not of
            meaning: a true paraphrase of a question is not a near duplicate.
        eval_overlap_threshold (`float`):
            The same similarity against the evaluation rows, lower (stricter) because leaking a test question into
            training data invalidates the evaluation.
        shingle_size (`int`, *optional*):
            The n of the character n-grams. `None` means 3 for QA (short questions: inserting one word into
            "Is the sun a star?" keeps a similarity of 0.61) and 5 for text (long documents share many 3-grams by
            chance: unrelated recipes reach 0.56 with 3-grams, 0.40 with 5-grams).
        min_reference_score (`float`, *optional*):
            With a reference scorer, drop rows whose score (mean log-likelihood per token of the answer part under
            the reference model) is below this.
    """

    min_words: int = 3
    max_words: int | None = None
    near_duplicate_threshold: float = 0.7
    eval_overlap_threshold: float = 0.5
    shingle_size: int | None = None
    min_reference_score: float | None = None

    def __post_init__(self):
        if self.min_words < 0 or (self.max_words is not None and self.max_words < self.min_words):
            raise ValueError(f"Need 0 <= min_words <= max_words, not {self.min_words} and {self.max_words}.")
        if self.shingle_size is not None and self.shingle_size < 1:
            raise ValueError(f"shingle_size must be at least 1, not {self.shingle_size}.")
        for name in ("near_duplicate_threshold", "eval_overlap_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {getattr(self, name)}.")
