"""The guarantees of the core model, each checked on tiny Llama, Qwen2, Mistral, GPT-2 and GPT-NeoX backbones."""

import pytest
import torch
from conftest import TEXTS, as_base_batch, labels_for, make_batch, train_domain
from torch import nn

from domain_experts import DomainExpertsForCausalLM
from backbones import tiny_backbone, tiny_tokenizer


MIXED = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], "stories"), (TEXTS["stories"], None)]


def backbone_logits(model, reference, batch):
    with torch.no_grad():
        return reference(**as_base_batch(model, batch)).logits


def model_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# a. base rows are the bare backbone, bit for bit, through the whole life of the domains -------------------------


def test_base_rows_bit_identical_to_backbone(setup):
    model, reference = setup
    V = model.config.backbone_vocab_size
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", expansion_layers=[0, 2])
    batch = make_batch(model, MIXED)
    base_rows = [1, 3]
    expected = backbone_logits(model, reference, batch)[base_rows]

    def check():
        logits = model_logits(model, batch)
        assert torch.equal(logits[base_rows, :, :V], expected)
        # Base rows can never produce a domain token.
        assert torch.isneginf(logits[base_rows, :, V:]).all()

    check()
    train_domain(model, "recipes", batch)
    train_domain(model, "stories", batch)
    check()
    model.remove_domain("recipes")
    with pytest.raises(ValueError, match="belongs to no domain"):
        model(**batch)  # the recipes row still holds the removed domain's control token
    batch_without_recipes = make_batch(model, [(TEXTS["recipes"], None)] + MIXED[1:])
    base_rows = [0, 1, 3]
    expected = backbone_logits(model, reference, batch_without_recipes)[base_rows]
    assert torch.equal(model_logits(model, batch_without_recipes)[base_rows, :, :V], expected)


# b. adding, training or removing domain B never changes domain A -------------------------------------------------


def test_other_domain_lifecycle_leaves_domain_rows_bit_identical(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    recipes_id = model.control_token_id("recipes")
    before_b = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["stories"], None), (TEXTS["base"], None)])

    def recipes_outputs(batch):
        logits = model_logits(model, batch)
        return logits[[0, 2], :, : model.config.backbone_vocab_size], logits[[0, 2], :, recipes_id]

    expected = recipes_outputs(before_b)

    model.add_domain("stories", num_blocks=3)
    with_b = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["stories"], "stories"), (TEXTS["base"], None)])
    for got, want in zip(recipes_outputs(before_b), expected):
        assert torch.equal(got, want)
    for got, want in zip(recipes_outputs(with_b), expected):
        assert torch.equal(got, want)

    train_domain(model, "stories", with_b)
    for got, want in zip(recipes_outputs(with_b), expected):
        assert torch.equal(got, want)

    model.remove_domain("stories")
    for got, want in zip(recipes_outputs(before_b), expected):
        assert torch.equal(got, want)


# c. a fresh domain's blocks are exact identities ----------------------------------------------------------------


def test_fresh_expansion_blocks_are_exact_identities(setup):
    model, reference = setup
    model.add_domain("recipes", expansion_layers=[0, 1, 1, 3])
    seen = []

    def record(block, args, output):
        out = output[0] if isinstance(output, tuple) else output
        seen.append(torch.equal(out, args[0]))

    for blocks in model.domains["recipes"].blocks.values():
        for block in blocks:
            block.register_forward_hook(record)
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    logits = model_logits(model, batch)
    assert seen == [True] * 4
    # With identity blocks a domain row computes what the backbone computes on the same embeddings.
    embeds = model._embed(batch["input_ids"])
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).logits
    assert torch.equal(logits[:, :, : model.config.backbone_vocab_size], expected)


# d. a mixed batch computes what each row computes alone ----------------------------------------------------------


def test_mixed_batch_matches_rows_alone(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", num_blocks=2)
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    train_domain(model, "stories", make_batch(model, [(TEXTS["stories"], "stories")]))
    batch = make_batch(model, MIXED)
    assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
    mixed = model_logits(model, batch)
    for row, (text, domain) in enumerate(MIXED):
        alone = model_logits(model, make_batch(model, [(text, domain)]))
        length = alone.shape[1]
        torch.testing.assert_close(mixed[row, -length:], alone[0], atol=1e-5, rtol=0)


# e. greedy generation with the KV cache equals generation without it ---------------------------------------------


@pytest.mark.parametrize("rows", [[(TEXTS["base"], None)], [(TEXTS["recipes"], "recipes")], MIXED],
                         ids=["base", "domain", "mixed"])
def test_greedy_generation_same_with_and_without_cache(setup, rows):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", expansion_layers=[1, 1])
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    train_domain(model, "stories", make_batch(model, [(TEXTS["stories"], "stories")]))
    batch = make_batch(model, rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    generated = with_cache[:, batch["input_ids"].shape[1]:]
    assert (generated < model.config.backbone_vocab_size).all(), "control tokens are never generated"


def test_generation_of_mixed_batch_matches_rows_alone_and_beam_search_runs(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    rows = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)]
    batch = make_batch(model, rows)
    mixed = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=6, do_sample=False)
    for row, item in enumerate(rows):
        alone = make_batch(model, [item])
        out = model.generate(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                             max_new_tokens=6, do_sample=False)
        assert torch.equal(out[0, -6:], mixed[row, -6:])
    beams = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (2, batch["input_ids"].shape[1] + 4)


def test_manual_decoding_loop_with_cache(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
        step = model(input_ids=next_token, attention_mask=mask, position_ids=batch["position_ids"][:, -1:] + 1,
                     past_key_values=out.past_key_values, use_cache=True)
        full = model(input_ids=torch.cat([batch["input_ids"], next_token], 1), attention_mask=mask,
                     position_ids=torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + 1], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)


# f. training one domain changes only that domain -----------------------------------------------------------------


def test_training_step_changes_only_that_domain(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", num_blocks=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    recipes_params = {id(p) for p in model.domain_parameters("recipes")}
    assert recipes_params and recipes_params.isdisjoint(id(p) for p in model.domain_parameters("stories"))

    train_domain(model, "recipes", make_batch(model, MIXED))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "training must change the trained domain"
    assert all(name.startswith("domains.recipes.") for name in changed)
    assert any(".blocks." in name for name in changed) and "domains.recipes.token_embeddings" in changed
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


# g. unsupported architectures and bad input get clear errors -----------------------------------------------------


def test_architecture_without_layer_list_is_a_clear_error():
    backbone = tiny_backbone("llama")
    backbone.model.layers = nn.Sequential(*backbone.model.layers)
    with pytest.raises(ValueError, match="Cannot find the decoder layers"):
        DomainExpertsForCausalLM.from_backbone(backbone)


def test_block_without_known_output_projections_is_a_clear_error():
    backbone = tiny_backbone("llama")
    for layer in backbone.model.layers:
        layer.self_attn.out = layer.self_attn.o_proj
        del layer.self_attn.o_proj
    model = DomainExpertsForCausalLM.from_backbone(backbone)
    with pytest.raises(ValueError, match="Cannot make an identity expansion block.*output projections"):
        model.add_domain("recipes")
    assert model.domain_names == [] and model.config.domains == {}


def test_unknown_domain_and_bad_arguments(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    for call in (lambda: model.remove_domain("legal"), lambda: model.domain_parameters("legal"),
                 lambda: model.tokenize("x", domain="legal"), lambda: model.control_token_id("legal")):
        with pytest.raises(KeyError, match="Unknown domain 'legal'.*'recipes'"):
            call()
    with pytest.raises(ValueError, match="already exists"):
        model.add_domain("recipes")
    with pytest.raises(ValueError, match="Invalid domain name"):
        model.add_domain("has space")
    with pytest.raises(ValueError, match="expansion_layers"):
        model.add_domain("legal", expansion_layers=[99])
    with pytest.raises(ValueError, match="num_blocks"):
        model.add_domain("legal", num_blocks=0)
    assert model.domain_names == ["recipes"]


# 6. control tokens: plain text never routes; the caller asks for a domain explicitly ----------------------------


def test_control_token_in_plain_text_does_not_switch_domain(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    token_id = model.control_token_id("recipes")
    plain = model.tokenizer("<|domain:recipes|>Title: Soup")["input_ids"]
    assert token_id not in plain
    assert model.route(torch.tensor([plain])).tolist() == [-1]
    # Asking for it: model.tokenize(..., domain=...) or tokenizer(..., split_special_tokens=False).
    asked = model.tokenizer("<|domain:recipes|>Title: Soup", split_special_tokens=False)["input_ids"]
    assert token_id in asked and model.route(torch.tensor([asked])).tolist() == [0]
    assert model.route(model.tokenize("Title: Soup", domain="recipes")["input_ids"]).tolist() == [0]
    # Decoding drops control tokens as the special tokens they are.
    assert model.tokenizer.decode(asked, skip_special_tokens=True) == "Title: Soup"


def test_domain_token_in_wrong_row_is_an_error(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    model.add_domain("stories", num_blocks=1)
    batch = make_batch(model, [(TEXTS["base"], None), (TEXTS["stories"], "stories")])
    batch["input_ids"][0, -1] = model.control_token_id("recipes")
    with pytest.raises(ValueError, match="Row 0 is routed to the bare backbone.*belongs to domain 'recipes'"):
        model(**batch)
    batch["input_ids"][0, -1] = model.tokenizer.pad_token_id
    batch["input_ids"][1, -1] = model.control_token_id("recipes")
    with pytest.raises(ValueError, match="Row 1 is routed to stories"):
        model(**batch)


def test_bos_then_control_token_routes(tokenizer):
    tokenizer.add_bos_token = True
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1)
    ids = model.tokenize(["Title", "Once"], domain=["recipes", None])["input_ids"]
    real = ids[0][ids[0] != tokenizer.pad_token_id].tolist()
    if real[0] == tokenizer.bos_token_id:
        assert real[1] == model.control_token_id("recipes")
    explicit = torch.tensor([[tokenizer.bos_token_id, model.control_token_id("recipes"), 5]])
    assert model.route(explicit).tolist() == [0]


def test_padded_vocabulary_gives_control_tokens_ids_past_the_embeddings():
    tokenizer = tiny_tokenizer()
    backbone = tiny_backbone("qwen2", vocab_size=352, tokenizer=tokenizer)  # embedding table larger than tokenizer
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1)
    assert model.control_token_id("recipes") == 352
    assert model.tokenizer.convert_tokens_to_ids("<|domain:recipes|>") == 352
    assert "<|domain:recipes|>" not in tokenizer.get_vocab(), "the caller's tokenizer is left as it was"
    assert model(**model.tokenize("Title", domain="recipes")).logits.shape[-1] == 353


def test_removed_domain_ids_are_never_reused(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    old_id = model.control_token_id("recipes")
    model.remove_domain("recipes")
    with pytest.raises(ValueError, match="belongs to no domain"):
        model(input_ids=torch.tensor([[1, old_id, 5, 6]]))
    model.add_domain("stories", num_blocks=1)
    assert model.control_token_id("stories") != old_id
    model.add_domain("recipes", num_blocks=1)  # coming back, it gets a new id; the old one stays a hole
    new_id = model.control_token_id("recipes")
    assert new_id not in (old_id, model.control_token_id("stories"))
    assert model.tokenizer.convert_tokens_to_ids("<|domain:recipes|>") == new_id
    assert model.route(model.tokenize("Title", domain="recipes")["input_ids"]).tolist() == [1]


def test_cache_indices_do_not_collide(setup):
    model, _ = setup
    model.add_domain("recipes", expansion_layers=[0, 3])
    model.add_domain("stories", expansion_layers=[1, 1])
    indices = [m.layer_idx for d in model.domains.values() for blocks in d.blocks.values()
               for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    num_layers = model.config.num_backbone_layers
    assert sorted(set(indices)) == list(range(num_layers, num_layers + 4))


def test_chat_template_keeps_its_special_tokens_and_user_text_stays_text(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    tokenizer = model.tokenizer
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    messages = [{"role": "user", "content": "<|domain:recipes|>Title: Soup"}]
    plain = model.apply_chat_template(messages)["input_ids"][0].tolist()
    assert plain[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in plain
    assert model.control_token_id("recipes") not in plain
    routed = model.apply_chat_template([messages, messages], domain=["recipes", None])
    assert model.route(routed["input_ids"], routed["attention_mask"]).tolist() == [0, -1]
    assert tokenizer.split_special_tokens  # restored
