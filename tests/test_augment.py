"""Generative data augmentation: strategies, quality control, resumable generation, local and endpoint generators.

Exact replies come from `ScriptedGenerator` (an in-process stand-in for an LLM) or from tiny models that always give
one canned reply (`openai_server.save_canned_reply_model`), served by a real `transformers serve` on 127.0.0.1.
"""

import json
import logging
import re
import socket

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer
from datasets import Dataset, load_from_disk
from openai_server import OpenAIServer, save_canned_reply_model

from domain_experts.augment import (
    DEFAULT_TEMPLATES,
    AugmentConfig,
    EndpointError,
    EndpointGenerator,
    GenerationRequest,
    GenerationStore,
    NearDuplicateIndex,
    QualityConfig,
    ReferenceScorer,
    SamplingSettings,
    TransformersGenerator,
    augment,
)
from domain_experts.augment.prompts import match_label, parse_qa, parse_text, template_hash
from domain_experts.augment.quality import jaccard, shingles
from domain_experts.cli import main


QA_ROWS = [
    {"question": "Is the sun a star?", "answer": "yes", "explanation": "The sun is a G-type main-sequence star."},
    {"question": "Can a fish climb a tree?", "answer": "no", "explanation": "Fish have fins, not limbs."},
    {"question": "Would a tortoise beat a hare in a sprint?", "answer": "no", "explanation": "Hares are far faster."},
    {"question": "Do foxes eat cheese when they find it?", "answer": "yes", "explanation": "Foxes are omnivores."},
]
EVAL_ROWS = [{"question": "Was the Eiffel Tower built in Paris for the 1889 World's Fair?", "answer": "yes",
              "explanation": "It was the entrance arch of the fair."}]
CANNED_QA = "Question: Can a whale breathe under water?\nAnswer: no\nExplanation: Whales are mammals; they breathe air."


def qa(question: str, answer: str = "yes", explanation: str = "Because it is so.") -> str:
    return f"Question: {question}\nAnswer: {answer}\nExplanation: {explanation}"


class ScriptedGenerator:
    """Replies with `replies[strategy][i]` to the i-th request of each strategy, in the order they are asked."""

    name = "scripted"

    def __init__(self, replies: dict[str, list[str]]):
        self.replies = replies
        self.calls = 0

    def generate(self, requests, settings):
        asked = {strategy: 0 for strategy in self.replies}
        for request in requests:
            strategy = next(s for s in self.replies if self._template_of(s, request.prompt))
            self.calls += 1
            yield request, self.replies[strategy][asked[strategy]]
            asked[strategy] += 1

    @staticmethod
    def _template_of(strategy: str, prompt: str) -> bool:
        return prompt.startswith(DEFAULT_TEMPLATES[strategy][:30])


class Crash:
    """Wraps a generator and dies (as a killed process would, with an exception no code catches) after `after`
    replies; counts the replies it passed on."""

    def __init__(self, generator, after: int | None = None):
        self.generator, self.after, self.passed = generator, after, 0
        self.name = generator.name

    def generate(self, requests, settings):
        for item in self.generator.generate(requests, settings):
            if self.passed == self.after:
                raise KeyboardInterrupt
            self.passed += 1
            yield item


# --- parsing ---------------------------------------------------------------------------------------------------------


def test_parse_qa_reads_markdown_and_stops_at_a_second_pair():
    reply = ("Sure! Here it is:\n**Question:** Is our sun one of the stars?\n**Answer:** Yes.\n"
             "**Explanation:** It is a star\nof type G.\n\nQuestion: Another one?\nAnswer: no")
    assert parse_qa(reply) == {"question": "Is our sun one of the stars?", "answer": "Yes.",
                               "explanation": "It is a star\nof type G."}
    assert parse_qa("Question: Is a coin round?\n\nNo: no\nAnswer: no")["question"] == "Is a coin round?"
    assert parse_qa("I cannot help with that.") == {}
    assert parse_qa("Question:   \nAnswer: yes") == {"answer": "yes"}  # an empty field is a missing field


def test_match_label_accepts_the_label_first_and_nothing_else():
    labels = ["yes", "no"]
    assert match_label("Yes.", labels) == "yes"
    assert match_label("no, because fish have fins", labels) == "no"
    assert match_label("Not really", labels) is None
    assert match_label("maybe", labels) is None


def test_parse_text_drops_chatter_and_quotes():
    assert parse_text('Sure! Here is the paraphrased text:\n"A fox saw a crow."') == "A fox saw a crow."
    assert parse_text("Paraphrased version:\nA fox saw a crow.\nIt sang.") == "A fox saw a crow.\nIt sang."
    assert parse_text("Here is the text you asked for:\n\n") == ""


# --- configs and templates -------------------------------------------------------------------------------------------


def test_configs_round_trip_through_json(tmp_path):
    config = AugmentConfig(strategies=["rewrite"], labels=["yes", "no"], templates={"rewrite": "Reword: {question}"})
    config.to_json_file(tmp_path / "augment.json")
    assert AugmentConfig.from_json_file(tmp_path / "augment.json") == config
    quality = QualityConfig(min_words=2, eval_overlap_threshold=0.4)
    quality.to_json_file(tmp_path / "quality.json")
    assert QualityConfig.from_json_file(tmp_path / "quality.json") == quality
    with pytest.raises(ValueError, match="Unknown QualityConfig fields"):
        QualityConfig.from_dict({"min_word": 2})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"templates": {"rewrite": "Reword {questoin}"}}, "unknown fields \\['questoin'\\]"),
        ({"templates": {"rewrite": "Reword {question"}}, "not a valid format string"),
        ({"templates": {"summarize": "{text}"}}, "unknown strategy 'summarize'"),
        ({"strategies": ["rewrite", "paraphrase"]}, "mix QA and text"),
        ({"task": "text", "strategies": ["rewrite"]}, "do not all belong to task 'text'"),
        ({"labels": ["yes"]}, "at least two distinct answers"),
        ({"temperature": -1.0}, "temperature >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kwargs)


def test_templates_can_be_replaced_and_the_hash_follows(tmp_path):
    prompts = []

    class Recorder(ScriptedGenerator):
        def generate(self, requests, settings):
            for request in requests:
                prompts.append(request.prompt)
                yield request, "nothing useful"

    config = AugmentConfig(strategies=["rewrite"], templates={"rewrite": "Reword [{question}] keeping {answer}."})
    result = augment(Dataset.from_list(QA_ROWS[:2]), Recorder({}), config)
    assert prompts == ["Reword [Is the sun a star?] keeping yes.", "Reword [Can a fish climb a tree?] keeping no."]
    assert {row["template_hash"] for row in result.dropped} == {template_hash("Reword [{question}] keeping {answer}.")}
    assert template_hash("Reword [{question}] keeping {answer}.") != template_hash(DEFAULT_TEMPLATES["rewrite"])


def test_new_pairs_ask_for_each_label_in_turn_from_seeded_shots():
    def requests_for(seed):
        generator = ScriptedGenerator({"new_pairs": ["x"] * 4})
        seen = []
        original = generator.generate

        def recording(requests, settings):
            seen.extend(requests)
            return original(requests, settings)

        generator.generate = recording
        augment(Dataset.from_list(QA_ROWS), generator, AugmentConfig(strategies=["new_pairs"], num_new_pairs=4,
                                                                     num_shots=2, seed=seed))
        return seen

    first, again, other = requests_for(0), requests_for(0), requests_for(1)
    assert [r.prompt for r in first] == [r.prompt for r in again] and [r.seed for r in first] == [r.seed for r in again]
    assert [r.prompt for r in first] != [r.prompt for r in other]
    asked = [r.prompt.split('whose answer is "')[1].split('"')[0] for r in first]
    assert asked == ["yes", "no", "yes", "no"]
    assert all(r.prompt.count("Question:") == 2 + 1 for r in first)  # two shots, and the reply format


# --- quality control -------------------------------------------------------------------------------------------------


def test_quality_control_drops_each_kind_of_bad_row_and_says_why(tmp_path):
    replies = {
        "rewrite": [
            "Sure! Here it is:\n**Question:** Is our sun one of the stars?\n**Answer:** Yes.\n**Explanation:** It is.",
            qa("Can a fish climb a tree?", "no"),  # the source row itself
            qa("Would a tortoise win a sprint against a hare?", "yes"),  # flips its source's label
            "I cannot do that.",
        ],
        "new_pairs": [
            qa("Is Mount Everest the tallest mountain above sea level?"),
            qa("Is the sun a star?", "no"),  # a source row
            qa("Is Everest the tallest mountain above sea level?"),  # near duplicate of the first new pair
            qa("Do penguins live at the North Pole?", "maybe"),
            qa("Why?"),
            qa("Was the Eiffel Tower built for the 1889 World's Fair in Paris?", "no"),  # reworded evaluation question
            qa(" ".join(["Is this question very long indeed"] * 5)),
            "Question: Is a tomato a fruit?\nAnswer: yes",  # no explanation
            qa("Do fish breathe through lungs?", "no"),  # asked for a "yes" pair
        ],
    }
    generator = ScriptedGenerator(replies)
    config = AugmentConfig(num_new_pairs=9)  # asking for yes, no, yes, ...
    result = augment(Dataset.from_list(QA_ROWS), generator, config, eval_dataset=Dataset.from_list(EVAL_ROWS),
                     output_dir=tmp_path)

    report = result.report
    assert report.requested == report.generated_now == 13 and report.kept == 2
    assert report.dropped == {"unparseable": 2, "invalid_label": 1, "label_changed": 1, "label_not_requested": 1,
                              "too_short": 1, "too_long": 1,
                              "eval_overlap": 1, "exact_duplicate": 2, "near_duplicate": 1}
    assert report.by_strategy["rewrite"] == {"requested": 4, "kept": 1, "unparseable": 1, "label_changed": 1,
                                             "exact_duplicate": 1}
    assert result.dataset["question"] == ["Is our sun one of the stars?",
                                          "Is Mount Everest the tallest mountain above sea level?"]
    rewrite = result.dataset[0]
    assert (rewrite["answer"], rewrite["strategy"], rewrite["source_rows"]) == ("yes", "rewrite", [0])
    assert rewrite["generator"] == "scripted"
    assert rewrite["template_hash"] == template_hash(DEFAULT_TEMPLATES["rewrite"])
    new_pair = result.dataset[1]
    assert new_pair["strategy"] == "new_pairs" and len(new_pair["source_rows"]) == 3

    details = {row["reason"]: row["detail"] for row in result.dropped}
    assert "evaluation row 0" in details["eval_overlap"]
    assert "generated row 1" in details["near_duplicate"]
    assert details["label_changed"] == "answer 'yes', the source row's is 'no'"
    assert details["label_not_requested"] == "answer 'no', the prompt asked for 'yes'"
    assert "Explanation:" in [row["detail"] for row in result.dropped if row["reason"] == "unparseable"][1]
    assert all(row["generator"] == "scripted" for row in result.dropped)

    saved = load_from_disk(str(tmp_path / "dataset"))
    assert saved.to_list() == result.dataset.to_list()
    assert json.loads((tmp_path / "report.json").read_text()) == report.to_dict()
    assert len((tmp_path / "dropped.jsonl").read_text().splitlines()) == 11

    # Other quality settings on the same output folder reuse the stored generations: nothing is generated again.
    rerun = ScriptedGenerator(replies)
    stricter = augment(Dataset.from_list(QA_ROWS), rerun, config, QualityConfig(min_words=8),
                       eval_dataset=Dataset.from_list(EVAL_ROWS), output_dir=tmp_path)
    assert rerun.calls == 0 and stricter.report.generated_now == 0
    assert stricter.dataset["question"] == ["Is Mount Everest the tallest mountain above sea level?"]


def test_paraphrases_of_text_rows():
    stories = [{"text": "A fox saw a crow holding cheese and flattered her until she sang and dropped it."},
               {"text": "The hare mocked the tortoise, lost the race by napping, and learned to respect him."},
               {"text": "A lion spared a mouse, and later the mouse gnawed through the net that held the lion."}]
    replies = ["Sure! Here is the paraphrased text:\n\"Seeing a crow with cheese, a fox praised her voice until she "
               "sang and let the cheese fall.\"",
               stories[1]["text"],
               ""]
    result = augment(Dataset.from_list(stories), ScriptedGenerator({"paraphrase": replies}))
    assert result.dataset["text"] == ["Seeing a crow with cheese, a fox praised her voice until she sang and let the "
                                      "cheese fall."]
    assert result.dataset.column_names[0] == "text"
    assert result.report.dropped == {"unparseable": 1, "exact_duplicate": 1}


def test_kept_rows_use_the_source_column_names():
    rows = [{"query": row["question"], "label": row["answer"]} for row in QA_ROWS]
    replies = {"rewrite": ["Question: Is our sun one of the stars?\nAnswer: yes"] + ["nothing"] * 3}
    config = AugmentConfig(strategies=["rewrite"], question_column="query", answer_column="label")
    result = augment(Dataset.from_list(rows), ScriptedGenerator(replies), config)
    assert result.dataset.column_names[:2] == ["query", "label"] and "question" not in result.dataset.column_names
    assert result.dataset[0]["query"] == "Is our sun one of the stars?" and result.dataset[0]["label"] == "yes"


def test_source_rows_that_do_not_fit_are_clear_errors():
    with pytest.raises(ValueError, match="neither a question column"):
        augment(Dataset.from_list([{"prompt": "x"}]), ScriptedGenerator({}))
    with pytest.raises(ValueError, match="not one of the labels"):
        augment(Dataset.from_list(QA_ROWS), ScriptedGenerator({}), AugmentConfig(labels=["true", "false"]))
    with pytest.raises(TypeError, match="str is not a generator"):
        augment(Dataset.from_list(QA_ROWS), "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="needs both a `scorer`"):
        augment(Dataset.from_list(QA_ROWS), ScriptedGenerator({}), quality=QualityConfig(min_reference_score=-1.0))


def test_near_duplicate_index_finds_what_brute_force_finds():
    questions = [row["question"] for row in QA_ROWS] + [
        "Is Mount Everest the tallest mountain above sea level?", "Is the sun a planet?", "Is Paris in France?",
        "Was the Eiffel Tower built in Paris for the 1889 World's Fair?", "Can a tortoise outrun a hare?"]
    queries = ["Is the sun really a star?", "Is Everest the tallest mountain above sea level?", "is the SUN a star",
               "Was the Eiffel Tower built for the 1889 World's Fair in Paris?", "Is Rome in Italy?",
               "Can you drown in a Swan Lake performance?"]
    for threshold in (0.3, 0.5, 0.7, 0.9):
        index = NearDuplicateIndex(threshold, shingle_size=3)
        for number, question in enumerate(questions):
            index.add(question, number)
        for query in queries:
            similarities = [jaccard(shingles(query, 3), shingles(q, 3)) for q in questions]
            best = max(range(len(questions)), key=similarities.__getitem__)
            expected = (best, pytest.approx(similarities[best])) if similarities[best] >= threshold else None
            assert index.query(query) == expected, (threshold, query)
    assert index.query("is the SUN a star")[1] == 1.0  # exact after normalization


# --- local generator, seeds and resuming -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canned_models(tmp_path_factory):
    """Folders of two tiny chat models: one replies with a valid QA pair, the other with a refusal."""
    root = tmp_path_factory.mktemp("canned")
    save_canned_reply_model(root / "qa", CANNED_QA)
    save_canned_reply_model(root / "refusal", "I am sorry, I cannot rewrite this.")
    return {"qa": str(root / "qa"), "refusal": str(root / "refusal")}


def random_generator(batch_size: int) -> TransformersGenerator:
    """A tiny random Llama without a chat template: its replies are noise, but seeded noise."""
    tokenizer = tiny_tokenizer()
    model = tiny_backbone("llama", vocab_size=len(tokenizer), tokenizer=tokenizer)
    return TransformersGenerator(model, tokenizer, batch_size=batch_size, name="random-llama")


def test_local_generator_applies_the_chat_template(canned_models):
    generator = TransformersGenerator.from_pretrained(canned_models["qa"], batch_size=2)
    assert generator.name == f"transformers:{canned_models['qa']}"
    result = augment(Dataset.from_list(QA_ROWS[1:3]), generator, AugmentConfig(strategies=["rewrite"]))
    assert result.dataset.to_list()[0] | {"seed": None} == {
        "question": "Can a whale breathe under water?", "answer": "no",
        "explanation": "Whales are mammals; they breathe air.", "strategy": "rewrite", "source_rows": [0],
        "generator": generator.name, "template_hash": template_hash(DEFAULT_TEMPLATES["rewrite"]), "seed": None}
    assert result.report.dropped == {"exact_duplicate": 1}


def test_seeded_sampling_does_not_depend_on_batching():
    requests = [GenerationRequest(f"k{i}", prompt, seed) for i, (prompt, seed) in
                enumerate([("Once upon a time", 1), ("Is the sun a star?", 2), ("Title: Pancakes", 3),
                           ("Once upon a time", 4)])]
    sampling = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.9)
    one_by_one = dict(random_generator(batch_size=1).generate(requests, sampling))
    batched = dict(random_generator(batch_size=3).generate(requests[::-1], sampling))
    assert one_by_one == batched
    assert one_by_one[requests[0]] != one_by_one[requests[3]]  # same prompt, other seed

    greedy = random_generator(batch_size=2)
    replies = dict(greedy.generate(requests[:1], SamplingSettings(max_new_tokens=12, temperature=0.0)))
    inputs = greedy.tokenizer("Once upon a time", return_tensors="pt")
    expected = greedy.model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                     pad_token_id=greedy.tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]
    assert replies[requests[0]] == greedy.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_crashed_run_resumes_where_it_stopped(tmp_path, caplog):
    dataset = Dataset.from_list(QA_ROWS)
    short_prompts = {"rewrite": "Reword: {question}", "new_pairs": "{examples}\nAnother, answer {answer}:"}
    config = AugmentConfig(max_new_tokens=8, num_new_pairs=2, num_shots=1, templates=short_prompts)
    uninterrupted = augment(dataset, random_generator(batch_size=2), config, output_dir=tmp_path / "uninterrupted")

    with pytest.raises(KeyboardInterrupt):
        augment(dataset, Crash(random_generator(batch_size=2), after=3), config, output_dir=tmp_path / "run")
    store = tmp_path / "run" / "generations.jsonl"
    assert len(store.read_text().splitlines()) == 3
    with open(store, "a") as file:
        file.write('{"key": "cut short by the cr')  # a crash in the middle of a write
    resumed_generator = Crash(random_generator(batch_size=2))
    with caplog.at_level(logging.WARNING):
        resumed = augment(dataset, resumed_generator, config, output_dir=tmp_path / "run")
    assert "incomplete last line" in caplog.text
    assert resumed_generator.passed == resumed.report.generated_now == 6 - 3
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6
    assert resumed.dropped == uninterrupted.dropped and resumed.dataset.to_list() == uninterrupted.dataset.to_list()


def test_store_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "generations.jsonl"
    path.write_text('{"key": "a", "reply": "x"}\nnot json\n{"key": "b", "reply": "y"}\n')
    with pytest.raises(ValueError, match="line 2, is not a generation record"):
        GenerationStore(path)


def test_reference_scores_are_mean_answer_log_likelihoods():
    tokenizer = tiny_tokenizer()
    model = tiny_backbone("llama", tokenizer=tokenizer)
    scorer = ReferenceScorer(model, tokenizer, batch_size=2)
    pairs = [("Question: Is the sun a star?\nAnswer:", " yes\nExplanation: It is."), ("Once upon", " a time"),
             ("Title:", " Pancakes")]
    scores = scorer.score(pairs)
    for (prompt, completion), score in zip(pairs, scores):  # each, alone and unpadded, through the model's own loss
        prefix = tokenizer(prompt)["input_ids"]
        ids = torch.tensor([prefix + tokenizer(completion, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[0, : len(prefix)] = -100
        assert score == pytest.approx(-model(input_ids=ids, labels=labels).loss.item(), abs=1e-4)

    replies = {"rewrite": [qa("Is our sun one of the stars?"), qa("Could a fish ever climb up a tree?", "no"),
                           qa("Might a tortoise outrun a hare over a short distance?", "no"),
                           qa("Will a fox eat cheese it finds?")]}
    rewrite = AugmentConfig(strategies=["rewrite"])
    unscored = augment(Dataset.from_list(QA_ROWS), ScriptedGenerator(replies), rewrite)
    assert unscored.report.kept == 4
    threshold = sorted(scorer.score([(f"Question: {row['question']}\nAnswer:",
                                      f" {row['answer']}\nExplanation: {row['explanation']}")
                                     for row in unscored.dataset]))[2]
    scored = augment(Dataset.from_list(QA_ROWS), ScriptedGenerator(replies), rewrite, scorer=scorer,
                     quality=QualityConfig(min_reference_score=threshold))
    assert scored.report.dropped == {"low_score": 2} and scored.report.kept == 2
    assert all(score >= threshold for score in scored.dataset["reference_score"])


# --- OpenAI-compatible endpoint --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with OpenAIServer() as running:
        yield running


@pytest.fixture
def online(monkeypatch):
    """conftest puts huggingface_hub offline (no test may reach the Hub), and offline InferenceClient refuses every URL,
    127.0.0.1 included: the endpoint tests, which only talk to 127.0.0.1, go online."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def test_offline_mode_is_a_clear_error(server, canned_models):
    generator = EndpointGenerator(server.base_url, model=canned_models["qa"], retry_backoff=0.01)
    with pytest.raises(EndpointError, match="offline mode .* Unset HF_HUB_OFFLINE"):
        augment(Dataset.from_list(QA_ROWS), generator)


def test_endpoint_generator_against_transformers_serve(server, canned_models, tmp_path, online):
    generator = EndpointGenerator(server.base_url, model=canned_models["qa"], concurrency=3)
    config = AugmentConfig(num_new_pairs=2, temperature=0.7, seed=5)
    result = augment(Dataset.from_list(QA_ROWS), generator, config, output_dir=tmp_path)
    # Every reply is the canned pair (answer "no"): the rewrites of "yes" rows change their label, the first rewrite
    # of a "no" row is kept, the new pair asked for "yes" answers otherwise, everything else repeats the kept row.
    assert result.report.dropped == {"label_changed": 2, "label_not_requested": 1, "exact_duplicate": 2}
    assert result.report.kept == 1
    row = result.dataset[0]
    assert (row["question"], row["answer"], row["source_rows"]) == ("Can a whale breathe under water?", "no", [1])
    assert row["generator"] == f"endpoint:{canned_models['qa']}"

    # The same model run locally gives the same replies.
    local = TransformersGenerator.from_pretrained(canned_models["qa"])
    stored = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    requests = [GenerationRequest(record["key"], record["prompt"], record["seed"]) for record in stored]
    settings = SamplingSettings(config.max_new_tokens, config.temperature, config.top_p)
    assert {request.key: reply for request, reply in local.generate(requests, settings)} == {
        record["key"]: record["reply"] for record in stored}


def test_malformed_endpoint_replies_are_dropped_and_counted(server, canned_models, online):
    generator = EndpointGenerator(server.base_url, model=canned_models["refusal"])
    result = augment(Dataset.from_list(QA_ROWS), generator, AugmentConfig(num_new_pairs=2))
    assert len(result.dataset) == 0 and result.report.dropped == {"unparseable": 6}
    assert {row["reply"] for row in result.dropped} == {"I am sorry, I cannot rewrite this."}
    assert {row["strategy"] for row in result.dropped} == {"rewrite", "new_pairs"}


def test_endpoint_going_down_mid_run_loses_no_rows(canned_models, tmp_path, online):
    class StopServerAfter:
        """The server dies after the second reply."""

        def __init__(self, generator, server):
            self.generator, self.server, self.name = generator, server, generator.name

        def generate(self, requests, settings):
            for number, item in enumerate(self.generator.generate(requests, settings), 1):
                yield item
                if number == 2:
                    self.server.stop()

    dataset, config = Dataset.from_list(QA_ROWS), AugmentConfig(num_new_pairs=4)
    store = tmp_path / "generations.jsonl"
    with OpenAIServer() as first:
        generator = EndpointGenerator(first.base_url, model=canned_models["qa"], max_retries=1, retry_backoff=0.05,
                                      concurrency=2)
        with pytest.raises(EndpointError, match=r"failed 2 attempts.*saved in .*generations.jsonl; rerun"):
            augment(dataset, StopServerAfter(generator, first), config, output_dir=tmp_path)
    before = store.read_text()
    assert 2 <= len(before.splitlines()) < 8

    with OpenAIServer() as second:  # another port: the generator's name, not its URL, identifies stored rows
        generator = EndpointGenerator(second.base_url, model=canned_models["qa"])
        result = augment(dataset, generator, config, output_dir=tmp_path)
    after = store.read_text()
    assert after.startswith(before)
    keys = [json.loads(line)["key"] for line in after.splitlines()]
    assert len(keys) == len(set(keys)) == 8
    assert result.report.generated_now == 8 - len(before.splitlines())


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


def test_endpoint_timeout_is_a_clear_error(silent_endpoint, tmp_path, online):
    generator = EndpointGenerator(silent_endpoint, model="m", timeout=0.3, max_retries=1, retry_backoff=0.01)
    with pytest.raises(EndpointError, match=r"failed 2 attempts; the last one timed out after 0.3 s.* 0 new "
                                            r"generations \(0 in all\) are saved"):
        augment(Dataset.from_list(QA_ROWS), generator, output_dir=tmp_path)


def test_cli_augments_from_an_endpoint_and_resumes_without_it(server, canned_models, tmp_path, capsys, online):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in QA_ROWS))
    test.write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS))
    template = tmp_path / "rewrite.txt"
    template.write_text("Reword this, answer {answer}:\n{pair}")
    args = ["augment", str(train), "--eval-data", str(test), "--output", str(tmp_path / "out"),
            "--endpoint-model", canned_models["qa"], "--strategies", "rewrite", "--template", f"rewrite={template}",
            "--min-words", "2", "--max-retries", "0"]
    assert main(args + ["--endpoint", server.base_url]) == 0
    assert "kept 1, dropped 3" in capsys.readouterr().out
    saved = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert saved["question"] == ["Can a whale breathe under water?"]
    assert saved["template_hash"] == [template_hash("Reword this, answer {answer}:\n{pair}")]
    assert json.loads((tmp_path / "out" / "quality_config.json").read_text())["min_words"] == 2

    # Everything is stored, so a rerun needs no endpoint; one that needs it reports the dead endpoint.
    dead = "http://127.0.0.1:9/v1"
    assert main(args + ["--endpoint", dead]) == 0
    assert main(args + ["--endpoint", dead, "--rewrites-per-row", "2"]) == 2
    assert "augment: error: http://127.0.0.1:9/v1 failed 1 attempt;" in capsys.readouterr().err


def run_cli_expecting_one_error_line(capsys, args: list[str]) -> str:
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("domain-experts augment: error: "), error
    return error[0]


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", b"", "The source file .*train.jsonl is empty \\(0 bytes\\)"),
    ("train.jsonl", b'{"question": "Is it?"}\nIs it?\n', "Line 2 of the source file .*train.jsonl is not JSON"),
    ("train.csv", "question\nCr\u00e8me?\n".encode("latin-1"), "The source file .*train.csv is not UTF-8 text"),
    ("train.xml", b"<q/>", "Cannot read source file .*train.xml: use a .jsonl, .json, .csv, .parquet, .txt file"),
])
def test_cli_bad_source_file_is_one_line_naming_it(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    error = run_cli_expecting_one_error_line(capsys, ["augment", str(tmp_path / name), "--output-dir",
                                                      str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9/v1"])
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists(), "nothing written"


@pytest.mark.parametrize("generator, message", [
    (["--endpoint", "127.0.0.1:8000/v1"], "The endpoint must be an http:// or https:// base URL"),
    (["--model", "SOURCE"], "SOURCE is a file: give a generator model folder or a Hub repo id"),
    (["--model", "./missing"], "No such generator model folder: ./missing"),
    (["--endpoint", "http://127.0.0.1:9/v1", "--reference-model", "SOURCE"], "SOURCE is a file: give a reference model"),
])
def test_cli_bad_generator_is_one_line_before_anything_is_written(tmp_path, capsys, generator, message):
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in QA_ROWS))
    generator = [str(source) if item == "SOURCE" else item for item in generator]
    error = run_cli_expecting_one_error_line(capsys, ["augment", str(source), "--output-dir", str(tmp_path / "out"),
                                                      *generator])
    assert message.replace("SOURCE", str(source)) in error, error
    assert not (tmp_path / "out").exists(), "nothing written"


def test_cli_damaged_config_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QA_ROWS))
    (tmp_path / "config.json").write_text('{"seed": ')
    error = run_cli_expecting_one_error_line(capsys, [
        "augment", str(tmp_path / "train.jsonl"), "--output-dir", str(tmp_path / "out"), "--endpoint",
        "http://127.0.0.1:9/v1", "--config", str(tmp_path / "config.json")])
    assert re.search("The AugmentConfig file .*config.json is damaged \\(not JSON", error), error


def test_an_output_folder_of_other_files_is_never_written_into(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no generations.jsonl or augment_config.json: refusing"):
        augment(Dataset.from_list(QA_ROWS), ScriptedGenerator({}), output_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
