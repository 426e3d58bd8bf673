"""The guarantees of the core model, each checked on a tiny random backbone of every family of the architecture table."""

import threading

import pytest
import torch
from backbones import FAMILIES, UNSUPPORTED, tiny_backbone, tiny_tokenizer, unsupported_backbone
from conftest import TEXTS, as_base_batch, labels_for, make_batch, train_domain

from domain_experts import DomainExpertsForCausalLM
from domain_experts.configuration_domain_experts import AdapterConfig
from domain_experts.modeling_domain_experts import (
    ARCHITECTURES,
    CACHE_NAME,
    Architecture,
    DomainExpertsCache,
    LogitsProcessing,
)


MIXED = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], "stories"), (TEXTS["stories"], None)]


def backbone_logits(model, reference, batch):
    with torch.no_grad():
        return reference(**as_base_batch(model, batch)).logits


def model_logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def two_trained_domains(model) -> None:
    """`recipes` (2 blocks, routed adapters on 2 layers, 8 tokens of its own) and `stories` (routed adapters only, on
    every projection of every layer), both trained a little."""
    model.add_domain("recipes", num_blocks=2, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8,
                     adapters=AdapterConfig(r=2, layers=[0, 3]))
    model.add_domain("stories", num_blocks=0, adapters=AdapterConfig(r=2, alpha=4))
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    train_domain(model, "stories", make_batch(model, [(TEXTS["stories"], "stories")]))


# a. base rows are the bare backbone, bit for bit, through the whole life of the domains -------------------------


def test_base_rows_bit_identical_to_backbone(setup):
    model, reference = setup
    V = model.config.backbone_vocab_size
    model.add_domain("recipes", num_blocks=2, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8)
    model.add_domain("stories", expansion_layers=[0, 2], adapters=AdapterConfig(r=2))
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
    # A control token with a row of its own (B's reads as BOS): both kinds are checked.
    model.add_domain("recipes", num_blocks=2, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8)
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    recipes_ids = model.config.domains["recipes"]["token_ids"]
    # Row 1 is the short one, so the batches with and without domain B have the same shape and padding.
    before_b = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], None)])

    def recipes_outputs(batch):
        logits = model_logits(model, batch)
        return logits[[0, 2], :, : model.config.backbone_vocab_size], logits[[0, 2]][:, :, recipes_ids]

    expected = recipes_outputs(before_b)
    model.add_domain("stories", num_blocks=3, corpus=[TEXTS["base"]] * 4, num_new_tokens=5, adapters=AdapterConfig(r=3),
                     control_embedding="bos")
    with_b = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], "stories"), (TEXTS["stories"], None)])
    assert with_b["input_ids"].shape == before_b["input_ids"].shape
    for batch in (before_b, with_b):
        for got, want in zip(recipes_outputs(batch), expected):
            assert torch.equal(got, want)
    train_domain(model, "stories", with_b)
    for got, want in zip(recipes_outputs(with_b), expected):
        assert torch.equal(got, want)
    model.remove_domain("stories")
    for got, want in zip(recipes_outputs(before_b), expected):
        assert torch.equal(got, want)


# c. a fresh domain is an exact identity ---------------------------------------------------------------------------


def test_fresh_domain_is_an_exact_identity(setup):
    model, reference = setup
    model.add_domain("recipes", expansion_layers=[0, 1, 1, 3], adapters=AdapterConfig(r=4))
    seen = []

    def record(block, args, output):
        seen.append(torch.equal(output[0] if isinstance(output, tuple) else output, args[0]))

    for blocks in model.domains["recipes"].blocks.values():
        for block in blocks:
            block.register_forward_hook(record)
    batch = make_batch(model, [(TEXTS["stories"], None), (TEXTS["base"], None)])
    routed = model_logits(model, batch, domain_ids=torch.tensor([0, 0]))  # the same ids, routed to the fresh domain
    assert seen == [True] * 4
    V = model.config.backbone_vocab_size
    assert torch.equal(routed[..., :V], backbone_logits(model, reference, batch))


def test_a_block_that_is_not_an_identity_is_refused(monkeypatch):
    # As if the table named only the attention's output projection: the MLP still writes into the residual stream.
    monkeypatch.setitem(ARCHITECTURES, "llama", Architecture("model", identity_projections=("self_attn.o_proj",)))
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    tokenizer = model.tokenizer
    with pytest.raises(ValueError, match="A fresh domain is not an exact identity on this llama backbone"):
        model.add_domain("recipes", num_blocks=2)
    assert model.domain_names == [] and model.config.domains == {} and model.tokenizer is tokenizer
    assert model.config.vocab_size == model.config.backbone_vocab_size


# d. a mixed batch computes what each row computes alone ----------------------------------------------------------


def test_mixed_batch_matches_rows_alone(setup):
    model, _ = setup
    two_trained_domains(model)
    alone = {row: model_logits(model, make_batch(model, [row]))[0] for row in MIXED}
    # A domain's rows next to each other (taken as a view) and apart (gathered and scattered by index).
    for rows in (MIXED, MIXED + MIXED[::-1]):
        batch = make_batch(model, rows)
        assert (batch["attention_mask"] == 0).any(), "the batch must exercise left padding"
        mixed = model_logits(model, batch)
        for index, row in enumerate(rows):
            length = alone[row].shape[0]
            torch.testing.assert_close(mixed[index, -length:], alone[row], atol=1e-5, rtol=0)


# e. generation: the KV cache changes nothing, a mixed batch generates what its rows generate alone ---------------


@pytest.mark.parametrize("rows", [[(TEXTS["base"], None)], [(TEXTS["recipes"], "recipes")], MIXED],
                         ids=["base", "domain", "mixed"])
def test_greedy_generation_same_with_and_without_cache(setup, rows):
    model, _ = setup
    two_trained_domains(model)
    batch = make_batch(model, rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    without_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    generated = with_cache[:, batch["input_ids"].shape[1]:]
    control_ids = [settings["token_ids"][0] for settings in model.config.domains.values()]
    assert not torch.isin(generated, torch.tensor(control_ids)).any(), "control tokens are never generated"


def test_generation_of_mixed_batch_matches_rows_alone_and_beam_search_runs(setup):
    model, _ = setup
    two_trained_domains(model)
    rows = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], "stories")]
    batch = make_batch(model, rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mixed = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    for row, item in enumerate(rows):
        alone = make_batch(model, [item])
        out = model.generate(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                             max_new_tokens=6, do_sample=False)
        assert torch.equal(out[0, -6:], mixed[row, -6:])
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams.shape == (3, batch["input_ids"].shape[1] + 4)
    # Each row's beams stay in its domain: row 1 runs on the bare backbone and never sees a domain token.
    assert (beams[1] < model.config.backbone_vocab_size).all()


def test_manual_decoding_loop_with_cache(setup):
    model, _ = setup
    two_trained_domains(model)
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        assert isinstance(getattr(out, CACHE_NAME), DomainExpertsCache)
        next_token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(next_token)], dim=1)
        step_inputs = {"input_ids": next_token, "attention_mask": mask, "position_ids": batch["position_ids"][:, -1:] + 1,
                       "cache": getattr(out, CACHE_NAME), "use_cache": True}
        with pytest.raises(ValueError, match="Continuing from a cache: pass the domain_ids"):
            model(**step_inputs)
        step = model(**step_inputs, domain_ids=out.domain_ids)
        full = model(input_ids=torch.cat([batch["input_ids"], next_token], 1), attention_mask=mask,
                     position_ids=torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + 1], 1))
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="other routes than domain_ids gives"):
        model(**{**step_inputs, "input_ids": torch.tensor([[5], [5]]), "cache": getattr(step, CACHE_NAME),
                 "attention_mask": torch.cat([mask, torch.ones_like(next_token)], dim=1)},
              domain_ids=torch.tensor([-1, -1]))



@pytest.mark.parametrize("family", ["llama"])  # the name is read by forward, before any layer
def test_cache_is_also_taken_under_its_name_before_transformers_5_24(setup):
    model, _ = setup
    two_trained_domains(model)
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    next_token = torch.tensor([[5], [5]])
    step_inputs = {"input_ids": next_token, "attention_mask": torch.cat([batch["attention_mask"], next_token > 0], 1),
                   "position_ids": batch["position_ids"][:, -1:] + 1, "use_cache": True}
    with torch.no_grad():
        steps = []
        for name in ("cache", "past_key_values"):
            out = model(**batch, use_cache=True)
            steps.append(model(**step_inputs, **{name: getattr(out, CACHE_NAME)}, domain_ids=out.domain_ids))
        assert torch.equal(steps[0].logits, steps[1].logits)
        with pytest.raises(ValueError, match="Pass the cache once"):
            model(**step_inputs, cache=getattr(out, CACHE_NAME), past_key_values=getattr(out, CACHE_NAME),
                  domain_ids=out.domain_ids)

def test_expansion_cache_holds_only_its_domains_rows(setup):
    model, _ = setup
    two_trained_domains(model)
    rows = [(TEXTS["base"], None), (TEXTS["recipes"], "recipes"), (TEXTS["stories"], None), (TEXTS["recipes"], "recipes")]
    with torch.no_grad():
        cache = getattr(model(**make_batch(model, rows), use_cache=True), CACHE_NAME)
    num_layers = model.config.num_backbone_layers
    model.add_domain("legal", expansion_layers=[1, 2])  # not in the batch: its cache layers stay empty
    with torch.no_grad():
        cache = getattr(model(**make_batch(model, rows), use_cache=True), CACHE_NAME)
    assert len(cache.layers) == num_layers + 4  # 2 recipes blocks, 2 legal blocks (stories has adapters only)
    assert all(layer.keys.shape[0] == 4 for layer in cache.layers[:num_layers])
    recipes_layers, legal_layers = cache.layers[num_layers : num_layers + 2], cache.layers[num_layers + 2 :]
    assert all(layer.keys.shape[0] == 2 and layer.rows.tolist() == [1, 3] for layer in recipes_layers)
    assert all(not layer.is_initialized and layer.rows.numel() == 0 for layer in legal_layers)


def test_cache_of_another_class_is_refused(setup):
    from transformers import DynamicCache

    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    with pytest.raises(TypeError, match="needs the cache it creates itself"):
        model(**make_batch(model, [(TEXTS["recipes"], "recipes")]), cache=DynamicCache(), use_cache=True)
    # transformers: "Assisted decoding requires a cache", a RuntimeError naming nothing the caller passed
    batch = make_batch(model, [(TEXTS["recipes"], "recipes")])
    for assisted in ({"assistant_model": model}, {"prompt_lookup_num_tokens": 2}):
        with pytest.raises(ValueError, match=f"does not support assisted generation \\({next(iter(assisted))}\\)"):
            model.generate(**batch, max_new_tokens=2, **assisted)


# f. training one domain changes only that domain -----------------------------------------------------------------


def test_training_step_changes_only_that_domain(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8,
                     adapters=AdapterConfig(r=2))
    model.add_domain("stories", num_blocks=2, adapters=AdapterConfig(r=2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    recipes_params = {id(p) for p in model.domain_parameters("recipes")}
    assert recipes_params and recipes_params.isdisjoint(id(p) for p in model.domain_parameters("stories"))

    train_domain(model, "recipes", make_batch(model, MIXED))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed, "training must change the trained domain"
    assert all(name.startswith("domains.recipes.") for name in changed)
    assert any(".blocks." in name for name in changed) and "domains.recipes.token_embeddings" in changed
    assert {"domains.recipes.output_embeddings", "domains.recipes.output_bias", "domains.recipes.logit_bias"} <= changed
    assert any(".adapters." in name and name.endswith("lora_B") for name in changed)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())


# g. the backbone's logit processing applies to the domain columns ------------------------------------------------


def test_domain_logits_follow_the_backbones_head(setup):
    """A domain token whose output row and bias copy backbone token k's (the domain's `logit_bias` included) has
    the logit of k: softcapped, scaled or divided as the family does (Gemma 2 and 3, Cohere, Granite), or as is."""
    model, _ = setup
    model.add_domain("recipes", num_blocks=1, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8)
    domain, k = model.domains["recipes"], 5
    head = model.backbone.get_output_embeddings().weight
    with torch.no_grad():
        domain.output_embeddings[0] = head[k]
        domain.logit_bias[k] = domain.output_bias[0] = 0.75
    own_id = model.config.domains["recipes"]["token_ids"][1]
    batch = make_batch(model, [(TEXTS["base"], "recipes"), (TEXTS["base"], None)])
    logits = model_logits(model, batch)
    assert torch.equal(logits[0, :, own_id], logits[0, :, k])
    processing = ARCHITECTURES[model.config.backbone_config.model_type].logits_processing
    if processing is not None and processing.kind == "softcap":
        cap = getattr(model.config.backbone_config, processing.config_attribute)
        assert logits[0, :, model.config.backbone_vocab_size :].max() <= cap
    # With gradients (training), the same logits come from the differentiable path.
    domain.requires_grad_(True)
    assert torch.equal(model(**batch).logits.detach(), logits)


# h. families the table does not declare, or declares otherwise, get clear errors ---------------------------------


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_families_are_refused_naming_what_is_missing(family):
    reasons = {"qwen2_moe": "mixture-of-experts", "qwen3_moe": "mixture-of-experts", "mixtral": "mixture-of-experts",
               "qwen3_next": "linear_attention layers"}
    with pytest.raises(ValueError, match=f"model_type '{family}'.*{reasons[family]}.*Supported model types: cohere"):
        DomainExpertsForCausalLM.from_backbone(unsupported_backbone(family))


def test_a_backbone_built_otherwise_than_its_table_entry_is_refused(monkeypatch):
    backbone = tiny_backbone("llama")
    backbone.model.layers = torch.nn.Sequential(*backbone.model.layers)
    with pytest.raises(ValueError, match="not one nn.ModuleList"):
        DomainExpertsForCausalLM.from_backbone(backbone)
    backbone = tiny_backbone("llama")
    for layer in backbone.model.layers:
        layer.self_attn.out = layer.self_attn.o_proj
        del layer.self_attn.o_proj
    with pytest.raises(ValueError, match="not built as DomainExperts' architecture table declares for llama"):
        DomainExpertsForCausalLM.from_backbone(backbone)
    # A table entry that does not compute what the backbone computes is caught by the probe, not served approximately.
    monkeypatch.setitem(ARCHITECTURES, "llama", Architecture("model", logits_processing=LogitsProcessing("multiply",
                                                                                                          "rms_norm_eps")))
    with pytest.raises(ValueError, match="does not reproduce this llama backbone exactly"):
        DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"))


def test_flex_attention_is_refused():
    backbone = tiny_backbone("llama")
    backbone.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        DomainExpertsForCausalLM.from_backbone(backbone)


def test_a_tokenizer_of_another_vocabulary_is_refused():
    with pytest.raises(ValueError, match="The tokenizer gives 320 ids, but the backbone has 100 embedding rows"):
        DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama", vocab_size=100), tokenizer=tiny_tokenizer())


def test_unknown_domain_and_bad_arguments(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    for call in (lambda: model.remove_domain("legal"), lambda: model.domain_parameters("legal"),
                 lambda: model.tokenizer("x", domain="legal"), lambda: model.control_token_id("legal")):
        with pytest.raises(KeyError, match="Unknown domain 'legal'.*'recipes'"):
            call()
    with pytest.raises(ValueError, match="already exists"):
        model.add_domain("recipes")
    for name in ("has space", "legal.v2", "v1.0", ".", "", "-x", "x" * 65, "é", None):
        with pytest.raises(ValueError, match="Invalid domain name.*1 to 64 characters"):
            model.add_domain(name)
    with pytest.raises(ValueError, match="expansion_layers"):
        model.add_domain("legal", expansion_layers=[99])
    with pytest.raises(ValueError, match="num_blocks"):
        model.add_domain("legal", num_blocks=0)
    with pytest.raises(ValueError, match="num_blocks"):
        model.add_domain("legal", num_blocks=True)
    assert model.domain_names == ["recipes"]
    model.add_domain("legal_v2-" + "x" * 55, num_blocks=1)  # the longest valid name works, and nothing broke
    assert model.domain_names == ["recipes", "legal_v2-" + "x" * 55]


# i. the forward pass changes no state: two threads share one model ----------------------------------------------


def _state(model) -> dict:
    return {name: dict(module.__dict__) for name, module in model.named_modules()}


def test_forward_leaves_every_module_unchanged(setup):
    model, _ = setup
    two_trained_domains(model)
    batch = make_batch(model, MIXED)
    before = _state(model)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        model(input_ids=out.logits[:, -1:].argmax(-1), cache=getattr(out, CACHE_NAME), domain_ids=out.domain_ids,
              attention_mask=torch.cat([batch["attention_mask"], torch.ones(4, 1, dtype=torch.long)], 1))
    model.generate(**batch, max_new_tokens=3, do_sample=False)
    after = _state(model)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
        for key, value in before[name].items():
            if key != "training":  # `generate` never trains; the flag is compared as a value below
                assert after[name][key] is value, (name, key)
        assert after[name].get("training") == before[name].get("training")


def test_two_threads_share_one_model(setup):
    model, _ = setup
    two_trained_domains(model)
    batches = [make_batch(model, MIXED), make_batch(model, [(TEXTS["stories"], "stories"), (TEXTS["recipes"], None),
                                                            (TEXTS["recipes"], "recipes")])]
    expected = [(model_logits(model, b), model.generate(**b, max_new_tokens=4, do_sample=False)) for b in batches]
    failures = []

    def run(index: int) -> None:
        for _ in range(8):  # 32 calls in 4 threads per family: 18 families make it the suite's costliest test
            got = (model_logits(model, batches[index]), model.generate(**batches[index], max_new_tokens=4, do_sample=False))
            if not (torch.equal(got[0], expected[index][0]) and torch.equal(got[1], expected[index][1])):
                failures.append(index)

    threads = [threading.Thread(target=run, args=(i % 2,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# j. control tokens: plain text never routes; the caller asks for a domain explicitly ----------------------------


def test_control_token_in_plain_text_does_not_switch_domain(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    token_id = model.control_token_id("recipes")
    plain = model.tokenizer("<|domain:recipes|>Title: Soup")["input_ids"]
    assert token_id not in plain
    assert model.route(torch.tensor([plain])).tolist() == [-1]
    asked = model.tokenizer("<|domain:recipes|>Title: Soup", split_special_tokens=False)["input_ids"]
    assert token_id in asked and model.route(torch.tensor([asked])).tolist() == [0]
    routed = model.tokenizer("Title: Soup", domain="recipes", return_tensors="pt")["input_ids"]
    assert model.route(routed).tolist() == [0]
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
    ids = model.tokenizer(["Title", "Once"], domain=["recipes", None], padding=True, return_tensors="pt")["input_ids"]
    real = ids[0][ids[0] != tokenizer.pad_token_id].tolist()
    if real[0] == tokenizer.bos_token_id:
        assert real[1] == model.control_token_id("recipes")
    explicit = torch.tensor([[tokenizer.bos_token_id, model.control_token_id("recipes"), 5]])
    assert model.route(explicit).tolist() == [0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # BOS of its own, and GPT-2's BOS that is also its EOS
def test_a_control_token_read_as_bos_makes_the_domain_read_as_the_backbone_after_bos(setup):
    """A fresh domain reads `<|domain:NAME|> text` exactly as the backbone reads `BOS text`; its control row is never
    read, so no training moves what it computes there."""
    model, reference = setup
    model.add_domain("recipes", num_blocks=1, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=4,
                     adapters=AdapterConfig(r=2), control_embedding="bos")
    V, bos = model.config.backbone_vocab_size, model.config.bos_token_id
    batch = make_batch(model, [(TEXTS["stories"], "recipes"), (TEXTS["base"], None)])
    input_ids = batch["input_ids"]
    assert (input_ids == model.control_token_id("recipes")).sum() == 1
    as_bos = {**as_base_batch(model, batch), "input_ids": input_ids.masked_fill(input_ids >= V, bos)}
    assert torch.equal(model_logits(model, batch)[..., :V], backbone_logits(model, reference, as_bos))

    trained_batch = make_batch(model, [(TEXTS["recipes"], "recipes")])
    train_domain(model, "recipes", trained_batch)
    before = model_logits(model, trained_batch)
    with torch.no_grad():
        model.domains["recipes"].token_embeddings[0].normal_()
    assert torch.equal(model_logits(model, trained_batch), before)


def test_a_learned_control_row_starts_at_the_mean_embedding_and_trains(setup):
    model, _ = setup
    model.add_domain("adapters", num_blocks=0, adapters=AdapterConfig(r=2))
    assert model.config.domains["adapters"]["control_embedding"] == "bos"  # the default for adapters only, with a BOS
    model.add_domain("recipes", num_blocks=1)
    assert model.config.domains["recipes"]["control_embedding"] == "learned"  # the default with blocks
    row = model.domains["recipes"].token_embeddings
    embeddings = model.backbone.get_input_embeddings().weight
    assert torch.equal(row[0], embeddings.float().mean(dim=0).to(embeddings.dtype))
    start = row.detach().clone()
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    assert not torch.equal(row[0], start[0])


def test_a_control_token_read_as_bos_needs_a_bos(tokenizer):
    backbone = tiny_backbone("llama")
    backbone.config.bos_token_id = None
    tokenizer.bos_token = None
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="has none .*use control_embedding='learned'"):
        model.add_domain("recipes", num_blocks=1, control_embedding="bos")
    with pytest.raises(ValueError, match="control_embedding must be one of 'bos', 'learned', got 'mean'"):
        model.add_domain("recipes", num_blocks=1, control_embedding="mean")
    assert not model.domains
    model.add_domain("recipes", num_blocks=0, adapters=AdapterConfig(r=2))  # without a BOS: a row of its own
    assert model.config.domains["recipes"]["control_embedding"] == "learned"


def test_padded_vocabulary_gives_control_tokens_ids_past_the_embeddings():
    tokenizer = tiny_tokenizer()
    backbone = tiny_backbone("qwen2", vocab_size=352, tokenizer=tokenizer)  # embedding table larger than tokenizer
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1)
    assert model.control_token_id("recipes") == 352
    assert model.tokenizer.convert_tokens_to_ids("<|domain:recipes|>") == 352
    assert "<|domain:recipes|>" not in tokenizer.get_vocab(), "the caller's tokenizer is left as it was"
    assert model(**model.tokenizer("Title", domain="recipes", return_tensors="pt")).logits.shape[-1] == 353


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
    assert model.route(model.tokenizer("Title", domain="recipes", return_tensors="pt")["input_ids"]).tolist() == [1]


def test_cache_indices_do_not_collide(setup):
    model, _ = setup
    model.add_domain("recipes", expansion_layers=[0, 3])
    model.add_domain("stories", expansion_layers=[1, 1])
    indices = [m.layer_idx for d in model.domains.values() for blocks in d.blocks.values()
               for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    num_layers = model.config.num_backbone_layers
    assert sorted(set(indices)) == list(range(num_layers, num_layers + 4))
    assert model.cache_layout == [(0, 0), (0, 3), (1, 1), (1, 1)]


def test_chat_template_keeps_its_special_tokens_and_user_text_stays_text(setup, tokenizer):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8)
    template = "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    for tok in (model.tokenizer.base, model.tokenizer.tokenizer_for("recipes")):
        tok.chat_template = template
    messages = [{"role": "user", "content": "<|domain:recipes|>Title: Pancakes </s>"}]
    plain = model.tokenizer.apply_chat_template(messages)["input_ids"]
    assert plain[0] == tokenizer.bos_token_id and plain[-1] == tokenizer.eos_token_id, "the template's own tokens"
    assert plain.count(tokenizer.eos_token_id) == 1, "a special token typed in a message stays text"
    assert model.control_token_id("recipes") not in plain
    routed = model.tokenizer.apply_chat_template([messages, messages], domain=["recipes", None], padding=True,
                                                 return_tensors="pt")
    assert model.route(routed["input_ids"], routed["attention_mask"]).tolist() == [0, -1]
    recipes_row = routed["input_ids"][0][routed["attention_mask"][0].bool()].tolist()
    assert recipes_row[:2] == [tokenizer.bos_token_id, model.control_token_id("recipes")]
    assert any(i > model.control_token_id("recipes") for i in recipes_row), "the domain's own tokenizer encodes it"
    assert model.tokenizer.base.split_special_tokens, "the model's tokenizer is left as it was"


def test_output_hidden_states(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", num_blocks=1)
    batch = make_batch(model, MIXED)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_backbone_layers + 1
    assert all(h.shape == (*batch["input_ids"].shape, model.backbone.config.get_text_config().hidden_size)
               for h in out.hidden_states)
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(**batch, output_attentions=True)


def test_inputs_of_the_wrong_shape_or_kind_are_one_clear_error(setup, tmp_path):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bad_calls = [
        ({"input_ids": ids[0]}, r"input_ids must be a tensor of token ids of shape \(batch_size, sequence_length\), "
                                r"got a 1-dimensional torch.int64 tensor; a single sequence is `input_ids\[None\]`"),
        ({"input_ids": ids.float()}, "input_ids must be a tensor of token ids .* torch.float32"),
        ({"inputs_embeds": torch.zeros(2, 3)}, r"inputs_embeds must be a tensor of shape \(batch_size"),
        ({"input_ids": ids[:0]}, r"The input is empty \(shape \(0, "),
        ({"input_ids": ids[:, :0]}, r"The input is empty"),
        # transformers pads a short mask with zeros, masking the last tokens without a word
        ({"input_ids": ids, "attention_mask": mask[:, 1:]}, r"attention_mask must have shape \(batch_size, past \+ "
                                                            rf"sequence_length\) = \({ids.shape[0]}, {ids.shape[1]}\)"),
        ({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1:]}, "labels must have the shape of the input"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    (tmp_path / "a_file").write_text("")
    # transformers only logs this and returns, saving nothing
    with pytest.raises(ValueError, match="is a file: pass a folder"):
        model.save_pretrained(tmp_path / "a_file")


def test_labels_ignore_control_tokens_and_padding(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=1)
    batch = make_batch(model, [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None)])
    loss = model(**batch, labels=labels_for(batch)).loss
    assert torch.isfinite(loss)


# l. routed adapters: configured like peft's LoRA, checked before anything changes ---------------------------------


def test_adapters_are_configured_like_a_lora_and_checked(setup):
    model, _ = setup
    targets = model.architecture.adapter_targets
    model.add_domain("legal", num_blocks=0, adapters={"r": 4, "alpha": 8, "target_modules": [targets[0].rsplit(".")[-1]],
                                                      "layers": [1, 2]})
    settings = model.config.domains["legal"]["adapters"]
    assert settings == {"r": 4, "alpha": 8, "target_modules": [targets[0]], "layers": [1, 2], "use_rslora": False}
    adapter = model.domains["legal"].adapters["1"].get_submodule(targets[0])
    assert adapter.lora_A.shape[0] == 4 and adapter.scaling == 2.0 and not adapter.lora_B.any()
    assert sum(p.numel() for p in model.domain_parameters("legal")) == 2 * adapter.lora_A.numel() \
        + 2 * adapter.lora_B.numel() + model.domains["legal"].token_embeddings.numel()
    for bad, message in [({"r": 0}, "r must be a positive integer"), ({"target_modules": ["nope"]}, "cannot target 'nope'"),
                         ({"layers": [99]}, r"layers must be indices in \[0, 4\)"), ({"lora_dropout": 0.1}, "Unknown")]:
        with pytest.raises(ValueError, match=message):
            model.add_domain("other", adapters=bad)
    with pytest.raises(ValueError, match="needs expansion blocks .* or adapters"):
        model.add_domain("other", num_blocks=0)
    assert model.domain_names == ["legal"]
