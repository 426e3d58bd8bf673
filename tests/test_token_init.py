"""Domain tokens started from the backbone's behaviour (`domain_experts.token_init`): a better start than the mean of
the pieces, chosen on validation text or refused, recorded in packs, and never a change to anything else."""

import copy
import json
import logging

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer
from conftest import TEXTS, make_batch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import load_texts
from domain_experts.evaluation import language_modeling
from domain_experts.token_init import (TokenInitConfig, add_domain_with_tokens, initialize_domain_tokens,
                                       same_characters)


QUICK = TokenInitConfig(distill_steps=8, fit_iterations=15, max_texts=40, max_length=96)


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    return {"train": load_texts("recipes", "train")[:40], "validation": load_texts("recipes", "validation")[:12]}


def bits_per_character(model, texts, domain):
    return language_modeling(model, texts, domain, max_length=96)["bits_per_character"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_the_fitted_start_reads_the_domain_better_and_changes_nothing_else(family, texts):
    """Initialised tokens read the texts they were fitted on better than the mean of their pieces (on a random tiny
    backbone held-out text says little; `benchmarks/domain_tokenizers.py` measures that on SmolLM2); base rows stay the
    backbone's and another domain's rows stay its own, bit for bit (Gemma 2: softcapped logits; GPT-2: tied head)."""
    backbone = tiny_backbone(family)
    reference = copy.deepcopy(backbone)
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tiny_tokenizer())
    model.add_domain("stories", num_blocks=1, corpus=[TEXTS["stories"]] * 4, num_new_tokens=5)
    model.add_domain("recipes", num_blocks=1, corpus=texts["train"], num_new_tokens=40)
    batch = make_batch(model, [(TEXTS["stories"], "stories"), (TEXTS["base"], None)])
    with torch.no_grad():
        before = model(**batch).logits
    mean_start = bits_per_character(model, texts["train"], "recipes")

    record = initialize_domain_tokens(model, "recipes", texts["train"], QUICK)

    assert bits_per_character(model, texts["train"], "recipes") < mean_start
    assert record["fit"]["new_tokens_seen"] > 0 and model.config.domains["recipes"]["token_init"] == record
    with torch.no_grad():
        after = model(**batch).logits
        backbone_logits = reference(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:],
                                    position_ids=batch["position_ids"][1:]).logits
    assert torch.equal(after, before)
    assert torch.equal(after[1:, :, : model.config.backbone_vocab_size], backbone_logits)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_validation_reads_the_same_characters_with_and_without_new_tokens(texts):
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("recipes", num_blocks=1, corpus=texts["train"], num_new_tokens=40)
    cut = same_characters(model, texts["validation"], max_length=32)
    assert any(len(short) < len(text) for short, text in zip(cut, texts["validation"]))
    for short, text in zip(cut, texts["validation"]):
        assert text.startswith(short)
        for domain in (None, "recipes"):  # neither tokenization is cut again at 32 tokens (BOS or control token first)
            ids = model.tokenizer.tokenizer_for(domain)(short, add_special_tokens=False, split_special_tokens=True)
            assert len(ids["input_ids"]) <= 31


def test_the_number_of_tokens_is_chosen_on_validation_text(texts):
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    record = add_domain_with_tokens(model, "recipes", texts["train"], texts["validation"], [10, 40], QUICK,
                                    num_blocks=1)
    tried = {k: v for k, v in record["validation_bits_per_character"].items() if k != "none"}
    best = min(tried, key=tried.get)
    assert record["new_tokens"] == int(best) and len(model.config.domains["recipes"]["tokens"]) == 1 + int(best)
    # The domain added is the one measured: its validation bits per character are those recorded, on the validation
    # texts cut where the backbone's tokens reach `max_length`, the same characters whatever the number tried.
    measured = same_characters(model, texts["validation"], QUICK.max_length)
    assert any(len(cut) < len(text) for cut, text in zip(measured, texts["validation"])), "some text must be cut"
    assert bits_per_character(model, measured, "recipes") == pytest.approx(tried[best], rel=1e-5)
    assert model.config.vocab_size == model.config.backbone_vocab_size + 1 + int(best), "no id spent on a trial"


def test_tokens_that_do_not_pay_off_are_left_out_saying_so(texts, caplog):
    """A tolerance no extension can meet (`-1`: better than zero bits) shows the decision: no tokens of its own, a
    warning naming the numbers, and the plain domain added."""
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    with caplog.at_level(logging.WARNING, logger="domain_experts"):
        record = add_domain_with_tokens(model, "recipes", texts["train"], texts["validation"], 20, QUICK,
                                        tolerance=-1.0, num_blocks=1)
    assert record["new_tokens"] == 0 and model.config.domains["recipes"]["tokens"] == ["<|domain:recipes|>"]
    assert "keeps the backbone's tokenizer" in caplog.text and "20" in caplog.text
    assert model.config.vocab_size == model.config.backbone_vocab_size + 1


def test_a_pack_records_how_its_tokens_started_and_loads_the_same(texts, tmp_path):
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("recipes", num_blocks=1, corpus=texts["train"], num_new_tokens=20)
    initialize_domain_tokens(model, "recipes", texts["train"], QUICK)
    assert model.domains["recipes"].logit_bias.abs().sum() > 0
    folder = model.save_domain("recipes", tmp_path / "pack")
    manifest = json.loads((folder / "domain_pack.json").read_text())
    assert manifest["token_init"]["method"] == "distilled input rows, fitted output rows"
    assert "logit_bias" in manifest["tensors"]

    other = DomainExpertsForCausalLM.from_backbone(model.backbone, tokenizer=tiny_tokenizer())
    other.load_domain(folder)
    assert other.config.domains["recipes"]["token_init"] == model.config.domains["recipes"]["token_init"]
    batch = make_batch(model, [(texts["validation"][0][:200], "recipes"), (TEXTS["base"], None)])
    with torch.no_grad():
        assert torch.equal(other(**batch).logits, model(**batch).logits)


def test_a_domain_without_tokens_or_of_an_older_layout_is_refused(texts):
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("plain", num_blocks=1)
    with pytest.raises(ValueError, match="no tokens of its own"):
        initialize_domain_tokens(model, "plain", texts["train"], QUICK)
    with pytest.raises(KeyError, match="Unknown domain 'nope'"):
        initialize_domain_tokens(model, "nope", texts["train"], QUICK)
    with pytest.raises(ValueError, match="needs validation texts"):
        add_domain_with_tokens(model, "recipes", texts["train"], [], 10, QUICK, num_blocks=1)
