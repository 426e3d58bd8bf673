"""The learned gate (routing rows without a control token) and the evaluation API and metrics."""

import copy
import json
import math
import re

import pytest
import torch
from backbones import tiny_backbone
from conftest import make_batch, train_domain

from domain_experts import DomainExpertsForCausalLM
from domain_experts.cli import main
from domain_experts.data import corpus_path, load_texts
from domain_experts.evaluation import forgetting_report, gate_accuracy, language_modeling, load_metric
from domain_experts.gate import train_gate


def samples(split: str, n: int) -> dict:
    return {"recipes": load_texts("recipes", split)[:n], "stories": load_texts("stories", split)[:n],
            None: load_texts("strategyqa", split, "question")[:n]}


@pytest.fixture(scope="module")
def gated_model():
    from backbones import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama", seed=1), tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", num_blocks=2)
    model.add_domain("legal", num_blocks=1)  # never given gate samples: the gate never routes to it
    train_domain(model, "recipes", make_batch(model, [(t[:200], "recipes") for t in load_texts("recipes", "train")[:4]]))
    train_domain(model, "stories", make_batch(model, [(t[:200], "stories") for t in load_texts("stories", "train")[:4]]))
    result = train_gate(model, samples("train", 60), threshold=0.5)
    assert result["num_samples"] == 180
    return model


def test_metric_modules_load_offline_and_compute():
    bpc = load_metric("bits_per_character").compute(
        negative_log_likelihoods=[math.log(2) * 10, math.log(2) * 6], num_tokens=[4, 4], num_characters=[8, 8])
    assert bpc["bits_per_character"] == pytest.approx(1.0) and bpc["perplexity"] == pytest.approx(4.0)  # 2 bits a token
    routing = load_metric("routing_accuracy").compute(predictions=["a", "none", "a"], references=["a", "a", "none"])
    assert routing["accuracy"] == pytest.approx(1 / 3)
    assert routing["per_route"] == {"a": 0.5, "none": 0.0}
    assert routing["confusion"] == {"a": {"a": 1, "none": 1}, "none": {"a": 1}}


def test_gate_routes_held_out_texts(gated_model):
    # A random 32-wide backbone with a toy tokenizer still separates the three kinds of text far above chance (1/3);
    # the real target (98% on SmolLM2) is measured by the slow test and the quickstart.
    accuracy = gate_accuracy(gated_model, samples("validation", 40))
    assert accuracy["accuracy"] >= 0.8, accuracy
    assert "legal" not in accuracy["confusion"].get("recipes", {})


def test_untrained_gate_never_runs(setup):
    model, reference = setup
    model.add_domain("recipes", num_blocks=1)
    calls = []
    model.gate_features = lambda *args, **kwargs: calls.append(1)
    batch = make_batch(model, [("Title: Soup", None), ("Once", "recipes")])
    assert model.route(batch["input_ids"], batch["attention_mask"]).tolist() == [-1, 0]
    assert calls == []


def test_gate_routing_is_decided_on_the_prompt_and_kept_while_generating(gated_model):
    model = gated_model
    recipe = load_texts("recipes", "test")[0][:120]
    inputs = model.tokenizer([recipe, "Is the sun a star?"], padding=True, return_tensors="pt")
    routes = model.route(inputs["input_ids"], inputs["attention_mask"]).tolist()
    assert routes[0] == model.domain_names.index("recipes")
    output = model(**inputs)
    assert output.domain_ids.tolist() == routes
    with_cache = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    without_cache = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    # The gate-routed row computes exactly what the row gets when routed explicitly.
    explicit = model(**inputs, domain_ids=torch.tensor(routes))
    assert torch.equal(explicit.logits, output.logits)


def test_gate_entries_survive_save_and_load(gated_model, tmp_path):
    gated_model.save_pretrained(tmp_path)
    loaded = DomainExpertsForCausalLM.from_pretrained(tmp_path)
    assert [loaded.config.domains[n]["gate"] for n in loaded.domain_names] == [True, True, False]
    assert not any(p.requires_grad for d in loaded.domains.values() for p in (d.gate_weight, d.gate_bias))
    batch = loaded.tokenizer(load_texts("recipes", "validation")[:3] + load_texts("stories", "validation")[:3],
                             padding=True, return_tensors="pt")
    assert torch.equal(loaded.route(**batch), gated_model.route(**batch))


def test_the_gate_trains_and_routes_where_the_tokenizer_has_no_pad_token(gated_model):
    """Llama 3's and GPT-2's tokenizers have no pad token: transformers refuses `padding=True` with them."""
    from backbones import tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    from domain_experts.gate import padded_prompts, prompt_features

    texts = [t[:80] for t in load_texts("recipes", "validation")[:3]]
    with_pad = gated_model.tokenizer.base
    batch = with_pad(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    assert all(torch.equal(a, b) for a, b in zip(padded_prompts(with_pad, texts, 16), batch.values()))

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer, bos_token="<s>",
                                     eos_token="</s>", padding_side="left")
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama", seed=1), tokenizer=no_pad)
    model.add_domain("recipes", num_blocks=1)
    assert model.tokenizer.pad_token_id is None
    # the same features as with a pad token: padded positions are masked out whatever their id
    torch.testing.assert_close(prompt_features(model, texts), prompt_features(gated_model, texts), rtol=0, atol=0)
    train_gate(model, {"recipes": samples("train", 8)["recipes"], None: samples("train", 8)[None]})
    assert gate_accuracy(model, {"recipes": texts})["per_route"].keys() == {"recipes"}


def test_train_gate_bad_input(gated_model):
    with pytest.raises(KeyError, match="Unknown domain 'cooking'"):
        train_gate(gated_model, {"cooking": ["x"], None: ["y"]})
    with pytest.raises(ValueError, match="No samples for: none"):
        train_gate(gated_model, {"recipes": ["x"], None: []})
    with pytest.raises(ValueError, match="threshold"):
        train_gate(gated_model, {"recipes": ["x"]}, threshold=1.5)


def test_bits_per_character_compare_across_tokenizers_and_base_rows_forget_nothing(setup):
    model, reference = setup
    reference_model = DomainExpertsForCausalLM.from_backbone(reference, tokenizer=model.tokenizer)
    texts = load_texts("recipes", "validation")[:6]
    model.add_domain("recipes", num_blocks=2, corpus=load_texts("recipes", "train")[:300], num_new_tokens=20)
    train_domain(model, "recipes", make_batch(model, [(t[:150], "recipes") for t in texts[:3]]))
    domain = language_modeling(model, texts, "recipes")
    base = language_modeling(model, texts, None)
    assert domain["num_texts"] == base["num_texts"] == 6
    assert 0 < domain["bits_per_character"] < 20 and 0 < base["bits_per_character"] < 20
    report = forgetting_report(model, reference_model, {"recipes": texts, None: load_texts("stories", "validation")[:6]})
    assert report["none"]["change"] == 0.0, "base rows are the bare backbone, bit for bit"
    assert report["recipes"]["reference"] == pytest.approx(base["bits_per_character"])


def test_cli_train_gate_and_eval(gated_model, tmp_path, capsys):
    folder = tmp_path / "model"
    gated_model.save_pretrained(folder)
    data = [f"recipes={corpus_path('recipes', 'validation')}", f"stories={corpus_path('stories', 'validation')}",
            f"none={corpus_path('strategyqa', 'validation')}:question",
            f"none={corpus_path('strategyqa', 'extra')}:question"]
    assert main(["train-gate", str(folder), *sum([["--data", d] for d in data], []), "--max-samples", "20",
                 "--output-dir", str(tmp_path / "gated")]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 80, "both none files count"
    assert main(["eval", str(tmp_path / "gated"), *sum([["--data", d] for d in data[:3]], []), "--max-samples", "4",
                 "--routing", "both", "--output", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"token", "gate", "gate_accuracy"}
    assert set(report["token"]) == {"recipes", "stories", "none"}
    assert main(["eval", str(folder), "--data", f"recipes={tmp_path / 'missing.jsonl'}"]) == 2
    assert "Cannot read" in capsys.readouterr().err


def test_train_gate_never_deletes_a_folder_it_did_not_write(gated_model, tmp_path, capsys):
    model_dir, output = tmp_path / "model", tmp_path / "output"
    gated_model.save_pretrained(model_dir)
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = ["train-gate", str(model_dir), "--data", f"recipes={corpus_path('recipes', 'validation')}", "--data",
            f"none={corpus_path('stories', 'validation')}", "--max-samples", "8", "--output-dir", str(output)]
    for overwrite in ([], ["--overwrite"]):
        assert main(args + overwrite) == 2
        assert "holds no config.json: refusing to write over a folder" in capsys.readouterr().err
        assert [p.name for p in output.iterdir()] == ["notes.txt"]
    (output / "notes.txt").unlink()
    assert main(args) == 0 and (output / "config.json").is_file()
    capsys.readouterr()
    assert main(args) == 2, "a saved model is replaced only when asked"
    assert "already holds a saved result; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_eval_prints_a_table_and_json_for_machines(gated_model, tmp_path, capsys):
    folder = tmp_path / "model"
    gated_model.save_pretrained(folder)
    data = ["--data", f"recipes={corpus_path('recipes', 'validation')}", "--data",
            f"none={corpus_path('strategyqa', 'validation')}:question", "--max-samples", "3"]
    assert main(["eval", str(folder), *data, "--output", str(tmp_path / "report.json")]) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["data", "route", "texts", "perplexity", "bits/char"]
    assert table[1].startswith("recipes") and "recipes domain (control token)" in table[1]
    assert table[2].startswith("none") and "bare backbone" in table[2]
    assert any(line.startswith("gate routing accuracy: ") for line in table)
    # Progress bars say what they measure.
    assert "recipes texts, recipes domain (control token)" in captured.err
    assert "none texts, bare backbone" in captured.err
    assert main(["eval", str(folder), *data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "report.json").read_text())


@pytest.mark.parametrize("content, message", [
    ('{"text": "Soup"}\n{"text": 5}\n', "Row 2 of the --data file for 'recipes' .* holds 5 \\(int\\)"),
    ("", "--data file for 'recipes' .* is empty \\(0 bytes\\)"),
    ('{"text": "Soup"}\nSoup\n', "Line 2 of the --data file for 'recipes' .* is not JSON"),
])
def test_eval_bad_data_is_one_line_naming_the_file(gated_model, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["eval", "some/model", "--data", f"recipes={bad}"]) == 2  # the data is read before any model
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("domain-experts eval: error: ") and str(bad) in error[0]
    assert re.search(message, error[0]), error[0]


def test_texts_cut_to_max_length_are_reported(gated_model, caplog):
    texts = load_texts("recipes", "validation")[:3]
    with caplog.at_level("WARNING"):
        language_modeling(gated_model, texts, "recipes", max_length=9)
    assert "recipes texts, recipes domain (control token): 3 of 3 texts are longer than 8 tokens" in caplog.text
