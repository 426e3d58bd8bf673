"""Domain tokenizers: trained from scratch, extended for a domain, owned by the domain inside the model."""

import copy
import json

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer
from conftest import as_base_batch, labels_for, make_batch, train_domain
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import load_texts
from domain_experts.scratch import PRESETS, backbone_parameters, create_backbone, train_tokenizer
from domain_experts.tokenization_domain_experts import extend_tokenizer, new_tokens_of


@pytest.fixture(scope="module")
def stories_tokenizer():
    return train_tokenizer(load_texts("stories", "train"), vocab_size=1024)


@pytest.fixture(scope="module")
def recipes_tokenizer(stories_tokenizer):
    return extend_tokenizer(stories_tokenizer, load_texts("recipes", "train"), num_new_tokens=300)


def all_shared_texts() -> list[str]:
    texts = [t for name in ("stories", "recipes") for split in ("train", "validation", "test")
             for t in load_texts(name, split)]
    for split in ("train", "validation", "test", "extra"):
        texts += load_texts("strategyqa", split, "question") + load_texts("strategyqa", split, "explanation")
    return texts


# 1. a tokenizer for a new small backbone -------------------------------------------------------------------------


def test_trained_tokenizer_has_the_asked_size_and_special_tokens(stories_tokenizer, tmp_path):
    assert len(stories_tokenizer) == 1024
    assert stories_tokenizer.bos_token == "<|bos|>" and stories_tokenizer.eos_token == "<|eos|>"
    assert stories_tokenizer.pad_token == "<|pad|>"
    stories_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The fox ate the grapes. ½ cup — naïve café"
    assert loaded(text)["input_ids"] == stories_tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_training_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([], vocab_size=1000)
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer(["", ""], vocab_size=1000)
    with pytest.raises(ValueError, match="smaller than the 256 byte tokens plus 3 special tokens"):
        train_tokenizer(["some text"], vocab_size=200)


# 2. extending a backbone's tokenizer ------------------------------------------------------------------------------


def test_extension_is_a_strict_superset_that_encodes_the_domain_shorter(stories_tokenizer, recipes_tokenizer):
    base_vocab = stories_tokenizer.get_vocab()
    extended_vocab = recipes_tokenizer.get_vocab()
    assert all(extended_vocab[token] == token_id for token, token_id in base_vocab.items())
    new_tokens = new_tokens_of(recipes_tokenizer, base_vocab)
    assert len(new_tokens) == 300 and len(extended_vocab) == len(base_vocab) + 300
    test = load_texts("recipes", "test")
    base_count = sum(len(stories_tokenizer(t)["input_ids"]) for t in test)
    extended_count = sum(len(recipes_tokenizer(t)["input_ids"]) for t in test)
    assert extended_count < 0.9 * base_count


def test_extended_tokenizer_only_joins_backbone_tokens(stories_tokenizer, recipes_tokenizer):
    """Each token of the extended encoding is a run of the backbone encoding joined: nothing is re-split."""
    for text in load_texts("recipes", "validation"):
        base_tokens = stories_tokenizer.convert_ids_to_tokens(stories_tokenizer(text)["input_ids"])
        position = 0
        for token in recipes_tokenizer.convert_ids_to_tokens(recipes_tokenizer(text)["input_ids"]):
            run = ""
            while run != token:
                run += base_tokens[position]
                position += 1
                assert len(run) <= len(token), (token, run)
        assert position == len(base_tokens)


def test_roundtrip_on_every_row_of_the_shared_corpora(stories_tokenizer, recipes_tokenizer):
    texts = all_shared_texts()
    for tokenizer in (stories_tokenizer, recipes_tokenizer):
        encoded = tokenizer(texts)["input_ids"]
        assert [tokenizer.decode(ids) for ids in encoded] == texts


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=200))
def test_roundtrip_on_generated_unicode(stories_tokenizer, recipes_tokenizer, text):
    for tokenizer in (stories_tokenizer, recipes_tokenizer):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_extension_bad_input_is_a_clear_error(stories_tokenizer):
    with pytest.raises(ValueError, match="num_new_tokens must be at least 1"):
        extend_tokenizer(stories_tokenizer, ["Title: Soup"], num_new_tokens=0)
    with pytest.raises(ValueError, match="corpus is empty"):
        extend_tokenizer(stories_tokenizer, [], num_new_tokens=10)


# 3. domain tokens inside the model -------------------------------------------------------------------------------


@pytest.fixture
def scratch_model(stories_tokenizer):
    """A tiny from-scratch backbone (untied and tied variants come from the families in test_modeling)."""
    tokenizer = copy.deepcopy(stories_tokenizer)
    tokenizer.padding_side = "left"
    backbone = create_backbone("tiny", tokenizer).eval()
    reference = copy.deepcopy(backbone)
    return DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer), reference


RECIPE = "Title: Pancakes\nIngredients:\n- 1 cup flour\n- 2 eggs\nSteps:\n1. Whisk the flour and eggs."
STORY = "Once upon a time a fox saw some grapes hanging high on a vine."


def test_add_domain_from_corpus_gives_domain_tokens_their_own_ids_and_embeddings(scratch_model):
    model, _ = scratch_model
    model.add_domain("recipes", num_blocks=2, corpus=load_texts("recipes", "train"), num_new_tokens=200)
    settings_ = model.config.domains["recipes"]
    assert settings_["token_ids"] == list(range(1024, 1024 + 201)) and model.config.vocab_size == 1225
    domain_tokenizer = model.tokenizer.tokenizer_for("recipes")
    assert domain_tokenizer.convert_tokens_to_ids(settings_["tokens"]) == settings_["token_ids"]
    assert domain_tokenizer is not model.tokenizer.base and model.tokenizer.tokenizer_for(None) is model.tokenizer.base
    ids = torch.tensor(model.tokenizer(RECIPE, domain="recipes")["input_ids"])
    assert (ids > 1024).any(), "recipe text uses the domain's own tokens"
    assert len(ids) < len(model.tokenizer(RECIPE)["input_ids"])
    # Each new token starts at the mean embedding of the backbone pieces it joins.
    embedding = model.backbone.get_input_embeddings().weight
    token = settings_["tokens"][5]
    pieces = model.tokenizer.base.backend_tokenizer.model.tokenize(token)
    expected = embedding[[p.id for p in pieces]].mean(0)
    torch.testing.assert_close(model.domains["recipes"].token_embeddings[5], expected)
    routed = model.tokenizer([RECIPE], domain="recipes", return_tensors="pt")["input_ids"]
    assert model.tokenizer.batch_decode(routed, skip_special_tokens=True) == [RECIPE]


def test_untied_backbone_gets_domain_output_rows(tokenizer):
    backbone = tiny_backbone("qwen2", tokenizer=tokenizer)  # qwen2 tiny config does not tie embeddings
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1, corpus=load_texts("recipes", "validation"), num_new_tokens=20)
    domain = model.domains["recipes"]
    assert domain.output_embeddings is not None and domain.output_embeddings.shape == (20, 32)
    token = model.config.domains["recipes"]["tokens"][1]
    pieces = [p.id for p in model.tokenizer.base.backend_tokenizer.model.tokenize(token)]
    torch.testing.assert_close(domain.output_embeddings[0], backbone.lm_head.weight[pieces].mean(0))


def test_guarantees_hold_with_extended_domains(scratch_model):
    model, reference = scratch_model
    V = model.config.backbone_vocab_size
    model.add_domain("recipes", num_blocks=2, corpus=load_texts("recipes", "train"), num_new_tokens=200)
    rows = [(RECIPE, "recipes"), (STORY, None), (STORY, "recipes")]
    batch = make_batch(model, rows)
    with torch.no_grad():
        expected_base = reference(**as_base_batch(model, batch)).logits[1]
    train_domain(model, "recipes", batch)
    recipes_columns = model.config.domains["recipes"]["token_ids"]
    with torch.no_grad():
        before = model(**batch).logits
    assert torch.equal(before[1, :, :V], expected_base)
    assert torch.isneginf(before[1, :, V:]).all(), "base rows never produce domain tokens"
    assert torch.isfinite(before[0][:, recipes_columns[1:]]).all(), "a domain row can produce its own tokens"
    assert torch.isneginf(before[0][:, recipes_columns[0]]).all(), "never its control token"

    # Add, train and remove a second extended domain: recipes rows and base rows stay bit-identical.
    model.add_domain("stories", num_blocks=2, corpus=load_texts("stories", "train"), num_new_tokens=100)
    stories_columns = model.config.domains["stories"]["token_ids"]
    assert stories_columns[0] == recipes_columns[-1] + 1
    mixed = make_batch(model, rows[:2] + [(STORY, "stories")])
    assert mixed["input_ids"].shape == batch["input_ids"].shape
    train_domain(model, "stories", mixed)
    with torch.no_grad():
        after = model(**mixed).logits
    assert torch.equal(after[:2, :, : before.shape[-1]], before[:2])
    assert torch.isneginf(after[0][:, stories_columns]).all(), "recipes rows never produce stories tokens"
    assert torch.isneginf(after[2][:, recipes_columns]).all(), "stories rows never produce recipes tokens"
    model.remove_domain("stories")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits[:2, :, : before.shape[-1]], before[:2])


def test_loss_and_generation_use_domain_tokens(scratch_model):
    model, _ = scratch_model
    model.add_domain("recipes", num_blocks=2, corpus=load_texts("recipes", "train"), num_new_tokens=200)
    model.add_domain("stories", num_blocks=1)
    batch = make_batch(model, [(RECIPE, "recipes"), (STORY, None), (STORY, "stories")])
    assert torch.isfinite(model(**batch, labels=labels_for(batch)).loss)
    train_domain(model, "recipes", batch, steps=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(with_cache, model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False))
    generated = with_cache[:, batch["input_ids"].shape[1]:]
    recipes_ids = torch.tensor(model.config.domains["recipes"]["token_ids"])
    assert not torch.isin(generated[1:], recipes_ids).any(), "only recipes rows produce recipes tokens"
    assert (generated[1] < model.config.backbone_vocab_size).all()
    for row, (text, domain) in enumerate([(RECIPE, "recipes"), (STORY, None)]):
        alone = make_batch(model, [(text, domain)])
        out = model.generate(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                             max_new_tokens=8, do_sample=False)
        assert torch.equal(out[0, -8:], with_cache[row, -8:])


def test_batch_encoding_with_padding_matches_rows_alone(scratch_model):
    model, _ = scratch_model
    model.add_domain("recipes", num_blocks=1, corpus=load_texts("recipes", "train"), num_new_tokens=100)
    rows = [(RECIPE, "recipes"), (STORY, None), ("Soup", "recipes")]
    for side in ("left", "right"):
        batch = model.tokenizer([t for t, _ in rows], domain=[d for _, d in rows], padding=True, padding_side=side,
                                return_tensors="pt")
        for i, (text, domain) in enumerate(rows):
            alone = model.tokenizer(text, domain=domain)["input_ids"]
            mask = batch["attention_mask"][i].bool()
            assert batch["input_ids"][i][mask].tolist() == alone
            assert (mask[: len(alone)].all() if side == "right" else mask[-len(alone):].all())


def test_text_that_is_not_text_is_a_clear_error(scratch_model):
    model, _ = scratch_model
    model.add_domain("recipes", num_blocks=1)
    for text, got in [(None, "NoneType"), (5, "int"), ([], r"\[\]"), (["Soup", 5], r"\['Soup', 5\]")]:
        for domain in ("recipes", None):
            with pytest.raises(ValueError, match=f"text must be a string or a non-empty list of strings, got {got}"):
                model.tokenizer(text, domain=domain)


@settings(max_examples=50, deadline=None)
@given(text=st.text(min_size=1, max_size=120))
def test_model_domain_tokenizer_roundtrip_and_plain_text_never_routes(recipes_model, text):
    model = recipes_model
    ids = model.tokenizer(text, domain="recipes")["input_ids"]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = model.tokenizer.tokenizer_for("recipes")(text)["input_ids"]
    assert model.tokenizer.tokenizer_for("recipes").decode(plain) == text
    assert model.control_token_id("recipes") not in plain


@pytest.fixture(scope="module")
def recipes_model(stories_tokenizer):
    model = DomainExpertsForCausalLM.from_backbone(create_backbone("tiny", stories_tokenizer),
                                                   tokenizer=stories_tokenizer)
    model.add_domain("recipes", num_blocks=1, corpus=load_texts("recipes", "validation"), num_new_tokens=50)
    return model


def test_tokenizer_for_another_backbone_is_a_clear_error(scratch_model, tokenizer):
    model, _ = scratch_model
    other = extend_tokenizer(tokenizer, load_texts("recipes", "validation"), num_new_tokens=10)
    with pytest.raises(ValueError, match="not an extension of the backbone's tokenizer.*another backbone"):
        model.add_domain("recipes", tokenizer=other)
    with pytest.raises(ValueError, match="num_new_tokens must be at least 1"):
        model.add_domain("recipes", corpus=["Title: Soup"], num_new_tokens=0)
    with pytest.raises(ValueError, match="needs num_new_tokens"):
        model.add_domain("recipes", corpus=["Title: Soup"])
    with pytest.raises(ValueError, match="corpus is empty"):
        model.add_domain("recipes", corpus=[], num_new_tokens=5)
    assert model.domain_names == [] and model.config.vocab_size == 1024


def test_ready_domain_tokenizer_is_remapped_past_other_domains(scratch_model, recipes_tokenizer):
    model, _ = scratch_model
    model.add_domain("stories", num_blocks=1, corpus=load_texts("stories", "validation"), num_new_tokens=20)
    model.add_domain("recipes", num_blocks=1, tokenizer=recipes_tokenizer)
    ids = model.config.domains["recipes"]["token_ids"]
    assert ids[0] == model.config.domains["stories"]["token_ids"][-1] + 1 and len(ids) == 301
    assert len(model.tokenizer(RECIPE, domain="recipes")["input_ids"]) == len(recipes_tokenizer(RECIPE)["input_ids"]) + 1


def test_domain_tokenizers_are_saved_and_load_with_auto_tokenizer(scratch_model, tmp_path):
    model, _ = scratch_model
    model.add_domain("recipes", num_blocks=1, corpus=load_texts("recipes", "train"), num_new_tokens=100)
    model.add_domain("stories", num_blocks=1)
    train_domain(model, "recipes", make_batch(model, [(RECIPE, "recipes")]))
    model.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path / "domain_tokenizers" / "recipes")
    assert saved(RECIPE)["input_ids"] == model.tokenizer.tokenizer_for("recipes")(RECIPE)["input_ids"]
    assert saved.split_special_tokens
    loaded = DomainExpertsForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.tokenizer.domain_tokenizers) == {"recipes"}
    batch = make_batch(model, [(RECIPE, "recipes"), (STORY, "stories"), (STORY, None)])
    assert torch.equal(make_batch(loaded, [(RECIPE, "recipes"), (STORY, "stories"), (STORY, None)])["input_ids"],
                       batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert len(config["domains"]["recipes"]["tokens"]) == 101


# 4. small backbones from scratch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_the_documented_sizes(preset, stories_tokenizer):
    import domain_experts.scratch as scratch

    model = create_backbone(preset, stories_tokenizer)
    count = sum(p.numel() for p in model.parameters())
    assert count == backbone_parameters(preset, len(stories_tokenizer))
    documented = backbone_parameters(preset, 4096)
    assert f"{documented:,}" in scratch.__doc__
    assert model.config.vocab_size == 1024 and model.config.tie_word_embeddings


def test_extension_keeps_special_tokens_added_after_the_vocabulary():
    """Chat tokens added after a BPE vocabulary (ids past it) keep their ids when a domain extends the tokenizer."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama", vocab_size=len(tokenizer), tokenizer=tokenizer),
                                                   tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1, corpus=load_texts("recipes", "validation"), num_new_tokens=20)
    domain_tokenizer = model.tokenizer.tokenizer_for("recipes")
    assert domain_tokenizer.convert_tokens_to_ids("<|user|>") == user == model.tokenizer.convert_tokens_to_ids("<|user|>")
    assert min(model.config.domains["recipes"]["token_ids"]) >= len(tokenizer)
