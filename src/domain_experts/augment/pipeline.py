"""`augment`: one pass from source rows to a quality-controlled dataset of generated rows.

    source rows -> generation requests -> generator -> store (jsonl, resumable) -> parse -> quality checks
                                                                                   -> kept rows, dropped rows, report
"""

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers.utils import logging

from ..files import check_replaceable, write_file_atomically, write_folder_atomically
from .config import AugmentConfig, QualityConfig
from .generators import EndpointError, GenerationRequest, Generator, SamplingSettings
from .prompts import (
    STRATEGIES,
    format_qa,
    join_labels,
    match_label,
    parse_qa,
    parse_text,
    qa_reply_format,
    template_hash,
)
from .quality import NearDuplicateIndex, ReferenceScorer
from .store import GenerationStore


logger = logging.get_logger(__name__)

# Files an augmentation run writes in its output folder.
GENERATIONS_FILE = "generations.jsonl"
DATASET_FOLDER = "dataset"
DROPPED_FILE = "dropped.jsonl"
REPORT_FILE = "report.json"
AUGMENT_CONFIG_FILE = "augment_config.json"
QUALITY_CONFIG_FILE = "quality_config.json"

DROP_REASONS = (
    "unparseable",  # the reply does not hold the fields asked for
    "invalid_label",  # the answer is not one of the allowed labels
    "label_changed",  # a rewrite states another answer than its source row
    "label_not_requested",  # a new pair answers otherwise than the prompt asked: the label balance would be lost
    "too_short",
    "too_long",
    "eval_overlap",  # exact or near duplicate of an evaluation row: would leak the test into training
    "low_score",  # under the reference model's threshold
    "exact_duplicate",  # of a source row or of a generated row kept earlier
    "near_duplicate",
)
PROVENANCE_FEATURES = {
    "strategy": Value("string"),
    "source_rows": List(Value("int64")),
    "generator": Value("string"),
    "template_hash": Value("string"),
    "seed": Value("int64"),
}


@dataclass
class AugmentReport:
    """How many generations an augmentation run asked for, kept and dropped (per reason), overall and per strategy."""

    generator: str
    requested: int = 0
    generated_now: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    by_strategy: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"generator: {self.generator}",
                 f"requested {self.requested}: {self.generated_now} generated now, "
                 f"{self.requested - self.generated_now} reused from the store",
                 f"kept {self.kept}, dropped {sum(self.dropped.values())}"]
        lines += [f"  {reason}: {count}" for reason, count in self.dropped.items()]
        for strategy, counts in self.by_strategy.items():
            details = ", ".join(f"{name} {count}" for name, count in counts.items())
            lines.append(f"{strategy}: {details}")
        return "\n".join(lines)


@dataclass
class AugmentResult:
    """What `augment` returns: the kept rows, the dropped rows with their reason, and the report."""

    dataset: Dataset
    dropped: list[dict[str, Any]]
    report: AugmentReport


@dataclass
class _Job:
    """One generation to ask for, with what it is for."""

    request: GenerationRequest
    strategy: str
    source_rows: list[int]
    template_hash: str
    requested_label: str | None = None  # the answer a new pair's prompt asks for


class _Source:
    """The source rows of a run in the shape the strategies need, with the run's resolved settings."""

    def __init__(self, dataset: Dataset, config: AugmentConfig):
        columns = set(dataset.column_names)
        task = config.task
        if task is None:
            if config.question_column in columns:
                task = "qa"
            elif config.text_column in columns:
                task = "text"
            else:
                raise ValueError(f"The dataset has columns {sorted(columns)}: neither a question column "
                                 f"({config.question_column!r}) nor a text column ({config.text_column!r}). "
                                 "Name them with question_column / text_column.")
        self.task = task
        required = [config.question_column, config.answer_column] if task == "qa" else [config.text_column]
        missing = [name for name in required if name not in columns]
        if missing:
            raise ValueError(f"A {task!r} dataset needs columns {required}; {missing} missing from {sorted(columns)}.")
        if len(dataset) == 0:
            raise ValueError("The source dataset is empty: there is nothing to augment.")
        self.strategies = config.strategies or [name for name, of_task in STRATEGIES.items() if of_task == task]
        if any(STRATEGIES[name] != task for name in self.strategies):
            raise ValueError(f"Strategies {self.strategies} do not fit a {task!r} dataset.")
        self.has_explanation = task == "qa" and config.explanation_column in columns
        self.has_context = task == "qa" and config.context_column in columns
        # the source's name of each field, for the output dataset
        self.column_names = {"question": config.question_column, "answer": config.answer_column,
                             "explanation": config.explanation_column, "context": config.context_column,
                             "text": config.text_column}
        self.rows = [self._row(raw, config) for raw in dataset]
        if task == "qa":
            self.labels = list(config.labels or dict.fromkeys(row["answer"] for row in self.rows))
            if config.labels is None and len(self.labels) > 20:
                raise ValueError(f"The source has {len(self.labels)} distinct answers; augmentation expects labels "
                                 "(yes/no, multiple choice). Pass `labels` to confirm the allowed set.")
            for index, row in enumerate(self.rows):
                if row["answer"] not in self.labels:
                    raise ValueError(f"Source row {index} has answer {row['answer']!r}, not one of the labels "
                                     f"{self.labels}.")
        else:
            self.labels = []

    def _row(self, raw: dict[str, Any], config: AugmentConfig) -> dict[str, str | None]:
        if self.task == "text":
            return {"text": str(raw[config.text_column])}
        row = {"question": str(raw[config.question_column]), "answer": str(raw[config.answer_column])}
        if self.has_explanation:
            row["explanation"] = raw[config.explanation_column]
        if self.has_context:
            row["context"] = raw[config.context_column]
        return row

    def main_text(self, row: dict[str, Any]) -> str:
        """What duplicates and length are judged on: the question (with its context), or the text."""
        if self.task == "text":
            return row["text"]
        return f"{row['context']}\n{row['question']}" if row.get("context") else row["question"]

    def reply_fields(self, strategy: str) -> tuple[str, ...]:
        fields = ("question", "answer") + (("explanation",) if self.has_explanation else ())
        return (("context",) if self.has_context and strategy == "new_pairs" else ()) + fields


def _derive_seed(seed: int, *parts: object) -> int:
    """A 32-bit seed for one generation, from the run's seed and what the generation is for."""
    text = "/".join(str(part) for part in (seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _jobs(source: _Source, config: AugmentConfig, generator: Generator, settings: SamplingSettings) -> list[_Job]:
    jobs = []

    def add(strategy: str, prompt: str, source_rows: list[int], seed: int, requested_label: str | None = None):
        key_material = json.dumps([generator.name, asdict(settings), prompt, seed], ensure_ascii=False)
        request = GenerationRequest(hashlib.sha256(key_material.encode()).hexdigest(), prompt, seed)
        jobs.append(_Job(request, strategy, source_rows, template_hash(config.template(strategy)), requested_label))

    labels = join_labels(source.labels) if source.labels else ""
    for strategy in source.strategies:
        template = config.template(strategy)
        if strategy in ("rewrite", "paraphrase"):
            for index, row in enumerate(source.rows):
                values = _Defaults({name: value for name, value in row.items() if value is not None})
                if strategy == "rewrite":
                    values.update(pair=format_qa(row), labels=labels,
                                  format=qa_reply_format(source.reply_fields(strategy), source.labels))
                prompt = template.format_map(values)
                for k in range(config.rewrites_per_row):
                    add(strategy, prompt, [index], _derive_seed(config.seed, strategy, index, k))
        elif strategy == "new_pairs":
            count = len(source.rows) if config.num_new_pairs is None else config.num_new_pairs
            reply_format = qa_reply_format(source.reply_fields(strategy), source.labels)
            for j in range(count):
                seed = _derive_seed(config.seed, strategy, j)
                shots = random.Random(seed).sample(range(len(source.rows)), min(config.num_shots, len(source.rows)))
                target = source.labels[j % len(source.labels)]  # ask for each label in turn: balanced new pairs
                examples = "\n\n".join(format_qa(source.rows[i]) for i in shots)
                prompt = template.format(examples=examples, answer=target, labels=labels, format=reply_format)
                add(strategy, prompt, shots, seed, requested_label=target)
    return jobs


class _Defaults(dict):
    """Template values where a field the row lacks (e.g. `context` in data without one) reads as empty."""

    def __missing__(self, key: str) -> str:
        return ""


def _candidate(job: _Job, reply: str, source: _Source) -> tuple[dict[str, Any] | None, str | None, str]:
    """Parse `reply` into a row: `(row, None, "")`, or `(None, reason, detail)` when it is dropped."""
    if job.strategy == "paraphrase":
        text = parse_text(reply)
        return ({"text": text}, None, "") if text else (None, "unparseable", "empty reply")
    fields = parse_qa(reply)
    # A rewrite's label comes from its source row: its reply may restate it, and need not.
    required = [name for name in source.reply_fields(job.strategy) if (job.strategy, name) != ("rewrite", "answer")]
    missing = [name for name in required if name not in fields]
    if missing:
        return None, "unparseable", f"no {', '.join(name.capitalize() + ':' for name in missing)} field"
    source_row = source.rows[job.source_rows[0]]
    row = {"question": fields["question"]}
    if job.strategy == "rewrite":
        row["answer"] = source_row["answer"]  # a rewrite keeps its source's label; the reply may only confirm it
        if "answer" in fields and match_label(fields["answer"], source.labels) != source_row["answer"]:
            stated = match_label(fields["answer"], source.labels)
            if stated is None:
                return None, "invalid_label", f"answer {fields['answer']!r} is none of {source.labels}"
            return None, "label_changed", f"answer {stated!r}, the source row's is {source_row['answer']!r}"
        if source.has_context:
            row["context"] = source_row["context"]
    else:
        label = match_label(fields["answer"], source.labels)
        if label is None:
            return None, "invalid_label", f"answer {fields['answer']!r} is none of {source.labels}"
        if label != job.requested_label:
            return None, "label_not_requested", f"answer {label!r}, the prompt asked for {job.requested_label!r}"
        row["answer"] = label
        if source.has_context:
            row["context"] = fields["context"]
    if source.has_explanation:
        row["explanation"] = fields["explanation"]
    return row, None, ""


def _main_texts(split: Dataset, source: _Source, config: AugmentConfig) -> list[str]:
    """The main texts of evaluation rows, read with the source's column names."""
    columns = [config.text_column] if source.task == "text" else [config.question_column]
    missing = [name for name in columns if name not in split.column_names]
    if missing:
        raise ValueError(f"The evaluation split has columns {split.column_names}, not {missing}: it must be "
                         "the same kind of rows as the source.")
    if source.task == "text":
        return [str(text) for text in split[config.text_column]]
    contexts = split[config.context_column] if source.has_context else [None] * len(split)
    return [source.main_text({"question": str(question), "context": context})
            for question, context in zip(split[config.question_column], contexts)]


def _scoring_pair(row: dict[str, Any], task: str) -> tuple[str, str]:
    """The (prompt, completion) a reference model scores: the answer part given the question part."""
    if task == "text":
        return "", row["text"]
    prompt = format_qa({"context": row.get("context"), "question": row["question"]}) + "\nAnswer:"
    completion = format_qa({"answer": row["answer"], "explanation": row.get("explanation")})[len("Answer:") :]
    return prompt, completion


def augment(
    dataset: Dataset,
    generator: Generator,
    config: AugmentConfig | None = None,
    quality: QualityConfig | None = None,
    eval_dataset: Dataset | list[Dataset] | None = None,
    scorer: ReferenceScorer | None = None,
    output_dir: str | os.PathLike | None = None,
) -> AugmentResult:
    r"""
    Generate new rows from `dataset` with `generator`, keep those that pass quality control, and report.

    Every generation is stored durably as soon as it arrives (in `output_dir/generations.jsonl`): rerunning after a
    crash, a dead endpoint or with other quality settings reuses what is stored and generates only what is missing.

    Args:
        dataset (`Dataset`):
            The source rows: QA rows (question, answer label, optional explanation and context) or text rows.
        generator (`Generator`): a `TransformersGenerator`, an `EndpointGenerator`, or any object of that protocol.
        config (`AugmentConfig`, *optional*): strategies, templates, sampling and seed.
        quality (`QualityConfig`, *optional*): the quality checks.
        eval_dataset (`Dataset` or `list[Dataset]`, *optional*):
            Evaluation rows (same columns as `dataset`): generated rows that repeat or nearly repeat one are dropped
            (`eval_overlap`), so no test question leaks into training data.
        scorer (`ReferenceScorer`, *optional*): scores kept rows; needs `quality.min_reference_score`.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where the store, the kept rows (`dataset/`, by `Dataset.save_to_disk`), the dropped rows
            (`dropped.jsonl`), the report (`report.json`) and both configs are written. `None` keeps everything in
            memory (and nothing is resumable).

    Returns:
        `AugmentResult`: `dataset` holds the kept rows (the source's columns plus provenance: `strategy`,
        `source_rows`, `generator`, `template_hash`, `seed`, and `reference_score` with a scorer); `dropped` the
        dropped ones with `reason` and `detail`; `report` the counts.

    Raises:
        `EndpointError`: the endpoint failed for good; what it generated before is stored, rerun to continue.
        `ValueError`: the dataset, the configs or the templates do not fit.
        `TypeError`: `generator` is not a generator.
    """
    if not isinstance(generator, Generator):
        raise TypeError(f"{type(generator).__name__} is not a generator: it needs a `name` and a `generate(requests, "
                        "settings)` method (see TransformersGenerator and EndpointGenerator).")
    config = config or AugmentConfig()
    quality = quality or QualityConfig()
    if (scorer is None) != (quality.min_reference_score is None):
        raise ValueError("Reference scoring needs both a `scorer` and `quality.min_reference_score`.")
    source = _Source(dataset, config)
    settings = SamplingSettings(config.max_new_tokens, config.temperature, config.top_p, config.system_prompt)
    jobs = _jobs(source, config, generator, settings)

    output_dir = Path(output_dir) if output_dir is not None else None
    if output_dir is not None:
        # An earlier run's folder is resumed; a folder of anything else is never written into.
        check_replaceable(output_dir, (GENERATIONS_FILE, AUGMENT_CONFIG_FILE))
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_json_file(output_dir / AUGMENT_CONFIG_FILE)
        quality.to_json_file(output_dir / QUALITY_CONFIG_FILE)
    with GenerationStore(output_dir / GENERATIONS_FILE if output_dir is not None else None) as store:
        generated_now = _generate_missing(jobs, generator, settings, store)
        replies = {job.request.key: store[job.request.key]["reply"] for job in jobs}

    kept, dropped = _quality_control(jobs, replies, source, quality, eval_dataset, scorer, config, generator.name)
    report = _report(jobs, kept, dropped, generator.name, generated_now)
    fields = ["text"] if source.task == "text" else (
        ["question", "answer"] + ["explanation"] * source.has_explanation + ["context"] * source.has_context
    )
    features = {source.column_names[name]: Value("string") for name in fields} | PROVENANCE_FEATURES
    if scorer is not None:
        features["reference_score"] = Value("float64")
    names = dict(zip(features, fields + list(features)[len(fields) :]))  # output column -> field of a kept row
    columns = {column: [row[names[column]] for row in kept] for column in features}  # from_list needs >= 1 row
    result = AugmentResult(Dataset.from_dict(columns, features=Features(features)), dropped, report)
    if output_dir is not None:
        _save(result, output_dir)
    logger.info(f"Augmentation done:\n{report}")
    return result


def _generate_missing(
    jobs: list[_Job], generator: Generator, settings: SamplingSettings, store: GenerationStore
) -> int:
    """Ask `generator` for every job `store` lacks, storing each reply as it arrives; returns how many."""
    by_key = {job.request.key: job for job in jobs}
    missing = list({job.request.key: job.request for job in jobs if job.request.key not in store}.values())
    if len(missing) < len(by_key):
        logger.info(f"{len(by_key) - len(missing)} of {len(by_key)} generations found in {store.path}; "
                    f"generating the other {len(missing)}.")
    if not missing:
        return 0
    done = 0
    try:
        with logging.tqdm(total=len(missing), desc="augment", unit="row") as progress:
            for request, reply in generator.generate(missing, settings):
                job = by_key[request.key]
                store.append({"key": request.key, "strategy": job.strategy, "source_rows": job.source_rows,
                              "generator": generator.name, "template_hash": job.template_hash, "seed": request.seed,
                              "prompt": request.prompt, "reply": reply})
                done += 1
                progress.update()
    except EndpointError as error:
        where = f"in {store.path}; rerun the same command to continue from there" if store.path else "in memory only"
        raise EndpointError(f"{error} {done} new generations ({len(store)} in all) are saved {where}.") from error
    still_missing = [key for key in by_key if key not in store]
    if still_missing:
        raise RuntimeError(f"{generator.name} returned no reply for {len(still_missing)} requests.")
    return done


def _quality_control(
    jobs: list[_Job],
    replies: dict[str, str],
    source: _Source,
    quality: QualityConfig,
    eval_dataset: Dataset | list[Dataset] | None,
    scorer: ReferenceScorer | None,
    config: AugmentConfig,
    generator_name: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the checks of `QualityConfig` in order; returns the kept rows and the dropped ones (with reasons)."""
    max_words = quality.max_words or 2 * max(len(source.main_text(row).split()) for row in source.rows)
    shingle_size = quality.shingle_size or (3 if source.task == "qa" else 5)
    eval_index = NearDuplicateIndex(quality.eval_overlap_threshold, shingle_size)
    splits = [eval_dataset] if isinstance(eval_dataset, Dataset) else list(eval_dataset or [])
    for split_number, split in enumerate(splits):
        for index, text in enumerate(_main_texts(split, source, config)):
            eval_index.add(text, f"evaluation row {index}" if len(splits) == 1 else f"evaluation split {split_number}, "
                           f"row {index}")

    kept, dropped = [], []

    def drop(candidate: dict[str, Any], reason: str, detail: str) -> None:
        dropped.append({**candidate, "reason": reason, "detail": detail})

    survivors = []
    for job in jobs:
        reply = replies[job.request.key]
        provenance = {"strategy": job.strategy, "source_rows": job.source_rows, "generator": generator_name,
                      "template_hash": job.template_hash, "seed": job.request.seed}
        row, reason, detail = _candidate(job, reply, source)
        if row is None:
            drop({**provenance, "reply": reply}, reason, detail)
            continue
        row.update(provenance)
        words = len(source.main_text(row).split())
        if words < quality.min_words:
            drop(row, "too_short", f"{words} words < {quality.min_words}")
        elif words > max_words:
            drop(row, "too_long", f"{words} words > {max_words}")
        elif (match := eval_index.query(source.main_text(row))) is not None:
            drop(row, "eval_overlap", f"{match[0]} (similarity {match[1]:.2f})")
        else:
            survivors.append(row)

    if scorer is not None and survivors:
        scores = scorer.score(_scoring_pair(row, source.task) for row in survivors)
        scored = []
        for row, score in zip(survivors, scores):
            row["reference_score"] = score
            if score < quality.min_reference_score:
                drop(row, "low_score", f"{score:.3f} < {quality.min_reference_score}")
            else:
                scored.append(row)
        survivors = scored

    seen = NearDuplicateIndex(quality.near_duplicate_threshold, shingle_size)
    for index, row in enumerate(source.rows):
        seen.add(source.main_text(row), f"source row {index}")
    for row in survivors:
        match = seen.query(source.main_text(row))
        if match is not None:
            drop(row, "exact_duplicate" if match[1] == 1.0 else "near_duplicate", f"{match[0]} (similarity "
                 f"{match[1]:.2f})")
            continue
        seen.add(source.main_text(row), f"generated row {len(kept)}")
        kept.append(row)
    return kept, dropped


def _report(jobs: list[_Job], kept: list[dict], dropped: list[dict], generator_name: str, generated_now: int):
    report = AugmentReport(generator=generator_name, requested=len(jobs), generated_now=generated_now, kept=len(kept))
    reasons = Counter(row["reason"] for row in dropped)
    report.dropped = {reason: reasons[reason] for reason in DROP_REASONS if reasons[reason]}
    for strategy in dict.fromkeys(job.strategy for job in jobs):
        counts = {"requested": sum(job.strategy == strategy for job in jobs),
                  "kept": sum(row["strategy"] == strategy for row in kept)}
        strategy_reasons = Counter(row["reason"] for row in dropped if row["strategy"] == strategy)
        counts.update({reason: strategy_reasons[reason] for reason in DROP_REASONS if strategy_reasons[reason]})
        report.by_strategy[strategy] = counts
    return report


def _save(result: AugmentResult, output_dir: Path) -> None:
    """Write the kept rows, dropped rows and report, each replacing the previous run's at once (never half written)."""
    write_folder_atomically(output_dir / DATASET_FOLDER, lambda folder: result.dataset.save_to_disk(str(folder)),
                            replaceable="state.json")
    write_file_atomically(output_dir / DROPPED_FILE,
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.dropped))
    write_file_atomically(output_dir / REPORT_FILE, json.dumps(result.report.to_dict(), indent=2) + "\n")
