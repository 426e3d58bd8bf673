"""Domain packs: save/load folders, push/pull through the local Hub (tests/hub_server.py), compose, CLI, security."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from backbones import FAMILIES, tiny_backbone, tiny_tokenizer
from conftest import TEXTS, make_batch, train_domain
from hub_server import set_hub_offline
from huggingface_hub import HfApi, ModelCard, constants, scan_cache_dir
from safetensors.torch import load_file, save_file

from domain_experts import DomainExpertsForCausalLM
from domain_experts.cli import main
from domain_experts.configuration_domain_experts import AdapterConfig
from domain_experts.data import load_texts
from domain_experts.packs import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    IncompatibleBackboneError,
    PackAccessError,
    PackError,
    PackManifest,
    backbone_info,
    push_pack_folder,
    verify_pack_files,
)


RECIPE = load_texts("recipes", "validation")[0][:160]
STORY = load_texts("stories", "validation")[0][:160]
PACK_FILES = [".gitattributes", "README.md", MANIFEST_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json"]


def new_model(family: str = "llama", seed: int = 0) -> DomainExpertsForCausalLM:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return DomainExpertsForCausalLM.from_backbone(tiny_backbone(family, seed=seed), tokenizer=tokenizer)


def with_recipes(family: str = "llama", tokens: bool = True, seed: int = 0) -> DomainExpertsForCausalLM:
    """A model with a trained `recipes` domain (with tokens of its own learned from recipes, by default)."""
    model = new_model(family, seed)
    corpus = {"corpus": load_texts("recipes", "validation"), "num_new_tokens": 30} if tokens else {}
    model.add_domain("recipes", num_blocks=2, **corpus)
    train_domain(model, "recipes", make_batch(model, [(RECIPE, "recipes"), (TEXTS["recipes"], "recipes")]))
    return model


def with_stories(family: str = "llama") -> DomainExpertsForCausalLM:
    """A model with a trained `stories` domain: blocks, routed adapters and tokens of its own."""
    model = new_model(family)
    model.add_domain("stories", expansion_layers=[0, 0, 2], corpus=load_texts("stories", "validation"), num_new_tokens=20,
                     adapters=AdapterConfig(r=2, layers=[1, 3]))
    train_domain(model, "stories", make_batch(model, [(STORY, "stories")]))
    return model


def row_outputs(model, rows: list[tuple[str, str | None]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: logits over the backbone vocabulary, and over the row's own domain tokens (whatever their ids)."""
    batch = make_batch(model, rows)
    with torch.no_grad():
        logits = model(**batch).logits
    vocab_size = model.config.backbone_vocab_size
    outputs = []
    for row, (_, domain) in enumerate(rows):
        own = model.config.domains[domain]["token_ids"][1:] if domain else []
        outputs.append((logits[row, :, :vocab_size], logits[row][:, own]))
    return outputs


def assert_same_outputs(got, expected) -> None:
    assert len(got) == len(expected)
    for (backbone_columns, own_columns), (want_backbone, want_own) in zip(got, expected):
        assert torch.equal(backbone_columns, want_backbone)
        assert torch.equal(own_columns, want_own)


def snapshot(model) -> dict:
    """What loading a pack may change: compared before and after a refused load."""
    return {
        "domains": list(model.domains),
        "config": json.dumps(model.config.domains, sort_keys=True),
        "vocab_size": model.config.vocab_size,
        "tokenizer": model.tokenizer.base.backend_tokenizer.to_str(),
        "state": sorted(model.state_dict()),
    }


RECIPE_ROWS = [(RECIPE, "recipes"), (TEXTS["base"], None), (TEXTS["recipes"], "recipes")]


def trained_pack(tmp_path_factory, tokens: bool) -> SimpleNamespace:
    model = with_recipes(tokens=tokens)
    folder = model.save_domain("recipes", tmp_path_factory.mktemp("pack") / "pack")
    return SimpleNamespace(model=model, folder=folder, outputs=row_outputs(model, RECIPE_ROWS))


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> SimpleNamespace:
    """A llama model with a trained `recipes` domain with 30 tokens of its own, its pack folder, and its outputs on
    RECIPE_ROWS. Read-only: tests copy the folder before changing it."""
    return trained_pack(tmp_path_factory, tokens=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> SimpleNamespace:
    """The same for a `recipes` domain without tokens of its own (control token only), trained otherwise."""
    return trained_pack(tmp_path_factory, tokens=False)


def copy_pack(pack: SimpleNamespace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pack.folder, tmp_path / "pack"))


# 1. folders: save, load, move a domain between models -------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied output embeddings
def test_pack_moves_an_extended_domain_to_a_model_with_other_domains(family, tmp_path):
    source = with_recipes(family)
    source.add_domain("stories", num_blocks=1)  # another domain in the source model: not in the pack
    expected = row_outputs(source, RECIPE_ROWS)
    folder = source.save_domain("recipes", tmp_path / "pack")

    assert sorted(os.listdir(folder)) == sorted(PACK_FILES[1:])
    manifest = PackManifest.from_folder(folder)
    assert manifest.name == "recipes" and manifest.expansion_layers == [1, 3] and len(manifest.tokens) == 30
    assert manifest.backbone == backbone_info(source)
    assert set(manifest.tensors) == set(source.domains["recipes"].state_dict())
    assert set(load_file(folder / WEIGHTS_NAME)) == set(manifest.tensors)  # only this domain's tensors
    again = source.save_domain("recipes", tmp_path / "again")
    assert all((again / f).read_bytes() == (folder / f).read_bytes() for f in os.listdir(folder)), "deterministic"
    pack_tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert not any("<|domain:" in entry["content"] for entry in pack_tokenizer["added_tokens"])

    target = with_stories(family)  # its stories tokens take the ids the recipes tokens had in `source`
    stories_before = row_outputs(target, [(STORY, "stories"), (TEXTS["base"], None)])
    assert target.load_domain(folder) == "recipes"
    assert target.config.domains["recipes"]["token_ids"][0] == source.config.backbone_vocab_size + 21
    assert target.config.domains["recipes"]["tokens"] == source.config.domains["recipes"]["tokens"]
    assert target.config.domains["recipes"]["pack"] == {"name": "recipes"}
    batch = make_batch(target, RECIPE_ROWS)
    assert (batch["input_ids"][0] > target.config.domains["recipes"]["token_ids"][0]).any(), "uses its own tokens"
    assert_same_outputs(row_outputs(target, RECIPE_ROWS), expected)
    assert_same_outputs(row_outputs(target, [(STORY, "stories"), (TEXTS["base"], None)]), stories_before)
    for key, tensor in source.domains["recipes"].state_dict().items():
        assert torch.equal(target.domains["recipes"].state_dict()[key], tensor), key
    decoded = target.tokenizer.batch_decode(make_batch(target, [(RECIPE, "recipes")])["input_ids"], skip_special_tokens=True)
    assert decoded == [RECIPE]


def test_gate_entry_is_carried_over(tmp_path):
    source = new_model()
    source.add_domain("recipes", num_blocks=2)
    with torch.no_grad():  # as domain_experts' gate training leaves it
        source.domains["recipes"].gate_weight.copy_(torch.linspace(-1, 1, source.domains["recipes"].gate_weight.numel()))
        source.domains["recipes"].gate_bias.fill_(0.25)
    source.config.domains["recipes"]["gate"] = True
    folder = source.save_domain("recipes", tmp_path / "pack")
    target = new_model()
    target.load_domain(folder)
    assert target.config.domains["recipes"]["gate"] is True
    batch = make_batch(target, [(TEXTS["base"], None), (RECIPE, None)])
    assert torch.equal(target.gate_probabilities(batch["input_ids"], batch["attention_mask"]),
                       source.gate_probabilities(batch["input_ids"], batch["attention_mask"]))
    assert not target.domains["recipes"].gate_weight.requires_grad

    other = new_model()
    other.config.gate_layer = 2
    with pytest.raises(PackError, match="gate_layer = 0"):
        other.load_domain(folder)
    assert other.domain_names == []


def test_packs_load_whatever_truncation_and_padding_the_tokenizers_last_used(tmp_path):
    """A fast tokenizer keeps the truncation and padding of its last call; transformers saves them in tokenizer.json
    and, loading that, writes them into tokenizer_config.json (max_length, stride, ...): how a tokenizer was last
    called, not what it is, so a pack's tokenizer check must not count them."""
    def used(model, domains):
        for domain in domains:
            model.tokenizer([RECIPE, STORY], domain=domain, truncation=True, max_length=16, stride=2,
                            padding="max_length", pad_to_multiple_of=8)
        return model

    source = with_recipes(tokens=True)
    source.add_domain("stories", num_blocks=1)
    packs = [used(source, [None, "recipes"]).save_domain(name, tmp_path / name) for name in ("recipes", "stories")]
    used(new_model(), [None]).save_pretrained(tmp_path / "backbone")
    for target in (DomainExpertsForCausalLM.from_pretrained(tmp_path / "backbone"), new_model()):
        for folder in packs:
            target.load_domain(folder)
        assert_same_outputs(row_outputs(target, RECIPE_ROWS), row_outputs(source, RECIPE_ROWS))


def test_name_clash_is_an_error_and_rename_keeps_outputs(recipes):
    expected, folder = recipes.outputs, recipes.folder
    target = new_model()
    target.add_domain("recipes", num_blocks=1)  # a `recipes` domain of its own
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"already has a domain named 'recipes'.*name="):
        target.load_domain(folder)
    assert snapshot(target) == before
    assert target.load_domain(folder, name="cooking") == "cooking"
    assert target.config.domains["cooking"]["tokens"][0] == "<|domain:cooking|>"
    cooking_rows = [(text, "cooking" if domain else None) for text, domain in RECIPE_ROWS]
    assert_same_outputs(row_outputs(target, cooking_rows), expected)
    with pytest.raises(ValueError, match="Invalid domain name"):
        target.load_domain(folder, name="no spaces")


def test_pack_of_another_backbone_is_rejected_naming_both(plain):
    folder = plain.folder
    other_weights = new_model(seed=1)
    before = snapshot(other_weights)
    with pytest.raises(IncompatibleBackboneError) as error:
        other_weights.load_domain(folder)
    message = str(error.value)
    pack_backbone, model_backbone = PackManifest.from_folder(folder).backbone, backbone_info(other_weights)
    assert pack_backbone.weights_sha256[:8] in message and model_backbone.weights_sha256[:8] in message
    assert "weights differ" in message and "unnamed llama backbone" in message
    assert snapshot(other_weights) == before

    other_config = new_model()
    other_config.backbone.config.rms_norm_eps = 1e-5  # same tensors, another computation
    with pytest.raises(IncompatibleBackboneError, match="config differ"):
        other_config.load_domain(folder)
    with pytest.raises(IncompatibleBackboneError, match="config and weights differ"):
        new_model("qwen2").load_domain(folder)


def test_fingerprint_survives_save_pretrained_and_weight_changes_are_seen(plain, tmp_path):
    model = plain.model
    model.save_pretrained(tmp_path / "model")
    reloaded = DomainExpertsForCausalLM.from_pretrained(tmp_path / "model")
    assert backbone_info(reloaded) == backbone_info(model) == backbone_info(tiny_backbone("llama"))
    pack = reloaded.save_domain("recipes", tmp_path / "pack")  # a pack from a saved model loads on the bare backbone
    fresh = new_model()
    fresh.load_domain(pack)
    assert_same_outputs(row_outputs(fresh, RECIPE_ROWS), plain.outputs)

    before = backbone_info(fresh).weights_sha256
    with torch.no_grad():
        fresh.backbone.model.norm.weight.mul_(2)  # in place: the cached digest must not be reused
    assert backbone_info(fresh).weights_sha256 != before


def rewrite_pack(folder: Path, edit_tensors=None, edit_manifest=None, rehash: bool = True) -> None:
    """Change a pack's tensors and/or manifest, recomputing the file hashes as a forger would."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if edit_tensors is not None:
        tensors = load_file(folder / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, folder / WEIGHTS_NAME)
    if edit_manifest is not None:
        edit_manifest(manifest)
    if rehash:
        data = (folder / WEIGHTS_NAME).read_bytes()
        manifest["files"][WEIGHTS_NAME] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _extra(tensors):
    tensors["blocks.1.0.extra.weight"] = torch.zeros(2)


def _missing(tensors):
    del tensors["token_embeddings"]


def _shape(tensors):
    tensors["token_embeddings"] = torch.zeros(5, 32)


def _dtype(tensors):
    tensors["token_embeddings"] = tensors["token_embeddings"].to(torch.float16)


MISMATCHES = {
    "extra": (_extra, "1 unexpected tensor.*blocks.1.0.extra.weight"),
    "missing": (_missing, "missing 1 tensor.*token_embeddings"),
    "shape": (_shape, r"token_embeddings is float32\[5, 32\], expected float32\[1, 32\]"),
    "dtype": (_dtype, r"token_embeddings is float16\[1, 32\], expected float32\[1, 32\]"),
}


def listing_of(tensors_edit):
    def edit(manifest):
        specs = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in manifest["tensors"].items()}
        tensors = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in specs.items()}
        tensors_edit(tensors)
        manifest["tensors"] = {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                               for k, t in tensors.items()}
    return edit


@pytest.mark.parametrize("kind", MISMATCHES)
@pytest.mark.parametrize("liar", ["file", "manifest"])
def test_tensors_that_do_not_match_are_rejected_and_nothing_is_attached(kind, liar, plain, tmp_path):
    folder = copy_pack(plain, tmp_path)
    edit, expected_message = MISMATCHES[kind]
    if liar == "file":  # the file differs from its manifest (hash updated, listing not)
        rewrite_pack(folder, edit_tensors=edit)
        message = f"{WEIGHTS_NAME} does not match its manifest: {expected_message}"
    else:  # file and manifest agree, on tensors the model cannot take
        rewrite_pack(folder, edit_tensors=edit, edit_manifest=listing_of(edit))
        message = f"not those of a domain with these blocks.*{expected_message}"
    target = new_model()
    target.add_domain("stories", num_blocks=1)
    before = snapshot(target)
    with pytest.raises(PackError, match=message):
        target.load_domain(folder)
    assert snapshot(target) == before


def test_modified_or_missing_files_are_rejected(recipes, tmp_path):
    folder = copy_pack(recipes, tmp_path)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF  # same size, one bit of one weight
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    target = new_model()
    with pytest.raises(PackError, match=f"{WEIGHTS_NAME} differ from the size or sha256 in its manifest"):
        target.load_domain(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(PackError, match=f"{WEIGHTS_NAME}, tokenizer.json differ"):
        target.load_domain(folder)
    assert target.domain_names == []


def test_a_pack_never_brings_code_or_pickles(recipes, tmp_path):
    folder = copy_pack(recipes, tmp_path)
    target = new_model()
    for bad in ("modeling_evil.py", "pytorch_model.bin", "../outside.json", "/etc/passwd.json"):
        def lists_it(manifest, bad=bad):
            manifest["files"][bad] = {"sha256": "0" * 64, "size": 1}
        rewrite_pack(folder, edit_manifest=lists_it, rehash=False)
        with pytest.raises(PackError, match=f"'files.{bad}' must be"):
            target.load_domain(folder)
        rewrite_pack(folder, edit_manifest=lambda manifest, bad=bad: manifest["files"].pop(bad), rehash=False)

    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    def rehash_config(manifest):
        data = (folder / "tokenizer_config.json").read_bytes()
        manifest["files"]["tokenizer_config.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    rewrite_pack(folder, edit_manifest=rehash_config)
    with pytest.raises(PackError, match="tokenizer_config.json changes auto_map"):
        target.load_domain(folder)
    assert target.domain_names == []


def test_manifest_validation_names_the_field(plain, tmp_path):
    folder = copy_pack(plain, tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    PackManifest.from_dict(manifest)
    assert PackManifest.from_dict(PackManifest.from_dict(manifest).to_dict()) == PackManifest.from_dict(manifest)
    for field, value, match in [
        ("format", "something.else", "'format' must be 'domain_experts.pack'"),
        ("expansion_layers", [], "'expansion_layers' must be a list of layer indices \\(non-empty unless the domain has adapters"),
        ("tokens", ["a", "a"], "'tokens' must be a list of distinct"),
        ("gate", {"trained": "yes", "layer": 0}, "'gate' must be"),
        ("name", "two words", "'name' must be a domain name"),
        ("control_embedding", "mean", "'control_embedding' must be 'bos' or 'learned'"),
    ]:
        with pytest.raises(PackError, match=match):
            PackManifest.from_dict({**manifest, field: value})
    with pytest.raises(PackError, match="format version 4; .* reads up to version 3. Upgrade"):
        PackManifest.from_dict({**manifest, "format_version": 4})
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PackError, match="not valid JSON"):
        new_model().load_domain(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="is not a domain pack"):
        new_model().load_domain(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No such pack folder"):
        new_model().load_domain(tmp_path / "no" / "such" / "pack")


def test_saving_writes_whole_packs_only(tmp_path, monkeypatch):
    import domain_experts.packs.save_load as packs

    model = new_model()
    model.add_domain("recipes", num_blocks=1)
    folder = model.save_domain("recipes", tmp_path / "pack")
    first = (folder / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        model.domains["recipes"].token_embeddings.add_(1.0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(packs, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_domain("recipes", folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == first and verify_pack_files(folder, PackManifest.from_folder(folder)) == []
    assert sorted(os.listdir(tmp_path)) == ["pack"], "no partial folder is left behind"
    monkeypatch.undo()

    model.save_domain("recipes", folder)  # replaces the pack whole
    assert (folder / WEIGHTS_NAME).read_bytes() != first and sorted(os.listdir(tmp_path)) == ["pack"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no domain_pack.json"):
        model.save_domain("recipes", tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="evaluation must look like"):
        model.save_domain("recipes", tmp_path / "other", evaluation={"perplexity": 3.0})
    with pytest.raises(KeyError, match="Unknown domain 'legal'"):
        model.save_domain("legal", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_model_card_has_hub_metadata(recipes, tmp_path):
    folder = recipes.model.save_domain("recipes", tmp_path / "pack", datasets=["alice/recipes-corpus"], license="apache-2.0",
                               evaluation={"dataset": "alice/recipes-corpus", "split": "test",
                                           "metrics": {"perplexity": 4.25}}, repo_id="alice/recipes")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "domain_experts" and card.data.license == "apache-2.0"
    assert card.data.tags == ["domain-experts", "knowledge-expansion", "recipes"]
    assert card.data.datasets == ["alice/recipes-corpus"]
    result = card.data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("perplexity", 4.25, "test")
    assert card.data.base_model is None  # a backbone built from a config has no Hub id
    assert 'domains=["alice/recipes"]' in card.text and "| perplexity | 4.25 |" in card.text
    assert "30 tokens of its own" in card.text


# 2. the Hub: push, pull, revisions, corruption, access --------------------------------------------------------------


@pytest.fixture
def users(hub_server):
    return {name: hub_server.add_user(name) for name in ("alice", "bob", "carol")}


def test_push_then_load_into_a_fresh_cache(hub_server, users, recipes, tmp_path):
    source, expected = recipes.model, recipes.outputs
    commit = source.push_domain_to_hub("recipes", "alice/recipes", token=users["alice"], datasets=["recipes"])
    api = HfApi(token=users["alice"])
    assert sorted(api.list_repo_files("alice/recipes")) == sorted(PACK_FILES)
    assert [c.commit_id for c in api.list_repo_commits("alice/recipes")][0] == commit.oid
    assert len(api.list_repo_commits("alice/recipes")) == 2, "the initial commit, then one commit for the whole pack"
    assert ModelCard.load("alice/recipes").data.library_name == "domain_experts"

    target = new_model()
    assert target.load_domain("alice/recipes", cache_dir=tmp_path / "fresh-cache") == "recipes"
    assert target.config.domains["recipes"]["pack"] == {"name": "recipes", "repo_id": "alice/recipes",
                                                        "revision": commit.oid}
    assert_same_outputs(row_outputs(target, RECIPE_ROWS), expected)
    assert not any("/resolve/" in r and r.endswith(".py") for r in hub_server.requests)

    source.push_domain_to_hub("recipes", "alice/recipes", token=users["alice"], datasets=["recipes"])  # unchanged
    assert len(api.list_repo_commits("alice/recipes")) == 2


def test_revision_pinning_and_offline_mode(hub_server, users, recipes, plain, monkeypatch):
    # Two versions of the `recipes` pack: with tokens of its own, then without (trained otherwise).
    first = push_pack_folder(recipes.folder, "alice/recipes", token=users["alice"]).oid
    second = push_pack_folder(plain.folder, "alice/recipes", token=users["alice"]).oid
    first_outputs, second_outputs = recipes.outputs, plain.outputs
    assert first != second

    pinned, latest = new_model(), new_model()
    pinned.load_domain("alice/recipes", revision=first)
    latest.load_domain("alice/recipes")
    assert_same_outputs(row_outputs(pinned, RECIPE_ROWS), first_outputs)
    assert_same_outputs(row_outputs(latest, RECIPE_ROWS), second_outputs)
    assert latest.config.domains["recipes"]["pack"]["revision"] == second

    requests = len(hub_server.requests)
    set_hub_offline(monkeypatch)
    offline_pinned, offline_latest = new_model(), new_model()
    offline_pinned.load_domain("alice/recipes", revision=first)
    offline_latest.load_domain("alice/recipes")
    assert_same_outputs(row_outputs(offline_pinned, RECIPE_ROWS), first_outputs)
    assert_same_outputs(row_outputs(offline_latest, RECIPE_ROWS), second_outputs)
    assert len(hub_server.requests) == requests, "offline loads make no request"
    with pytest.raises(OSError, match="not in the Hugging Face cache.*offline"):
        new_model().load_domain("bob/never-downloaded")


@pytest.mark.parametrize("path", [WEIGHTS_NAME, MANIFEST_NAME, "tokenizer.json"])
def test_corrupted_download_is_an_error_and_does_not_poison_the_cache(hub_server, users, recipes, path):
    expected = recipes.outputs
    push_pack_folder(recipes.folder, "alice/recipes", token=users["alice"])
    hub_server.corrupt("alice/recipes", path)  # same size, first byte flipped: huggingface_hub does not notice
    target = new_model()
    before = snapshot(target)
    with pytest.raises(PackError, match="does not match the sha256|not valid JSON"):
        target.load_domain("alice/recipes")
    assert snapshot(target) == before
    cached = [file.file_name for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos for revision in repo.revisions for file in revision.files]
    assert path not in cached, "the corrupted file left the cache"
    with pytest.raises(PackError):  # still corrupted on the server: still refused, never served from the cache
        target.load_domain("alice/recipes")

    hub_server.repair("alice/recipes", path)
    target.load_domain("alice/recipes")
    assert_same_outputs(row_outputs(target, RECIPE_ROWS), expected)


def test_private_pack_needs_a_valid_token(hub_server, users, plain):
    source = plain.model
    source.push_domain_to_hub("recipes", "alice/secret", token=users["alice"], private=True)
    assert HfApi(token=users["alice"]).model_info("alice/secret").private
    target = new_model()
    with pytest.raises(PackAccessError, match="'alice/secret'.*private and no token was passed.*token="):
        target.load_domain("alice/secret")
    with pytest.raises(PackAccessError, match="private and the token passed has no access"):
        target.load_domain("alice/secret", token=users["bob"])
    with pytest.raises(PackAccessError, match="HTTP 401.*token is invalid"):
        target.load_domain("alice/secret", token="hf_not_a_real_token")
    assert target.domain_names == []
    target.load_domain("alice/secret", token=users["alice"])
    assert_same_outputs(row_outputs(target, RECIPE_ROWS), plain.outputs)

    with pytest.raises(PackAccessError, match="may not write to 'alice/secret'"):
        source.push_domain_to_hub("recipes", "alice/secret", token=users["bob"])
    with pytest.raises(PackAccessError, match="needs a valid write token"):
        source.push_domain_to_hub("recipes", "alice/other")
    assert len(HfApi(token=users["alice"]).list_repo_commits("alice/secret")) == 2


def test_a_repo_without_a_manifest_is_not_a_pack(hub_server, users, tmp_path):
    api = HfApi(token=users["alice"])
    api.create_repo("alice/model")
    (tmp_path / "config.json").write_text("{}")
    api.upload_file(path_or_fileobj=tmp_path / "config.json", path_in_repo="config.json", repo_id="alice/model")
    with pytest.raises(PackError, match="alice/model is not a domain pack: it has no domain_pack.json"):
        new_model().load_domain("alice/model")
    with pytest.raises(PackError, match="has no revision 'v9'"):
        new_model().load_domain("alice/model", revision="v9")
    with pytest.raises(PackAccessError, match="does not exist"):
        new_model().load_domain("alice/nothing-here")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_users_publish_packs_and_a_third_composes_them(family, hub_server, users):
    alice, bob = with_recipes(family), with_stories(family)
    alice.push_domain_to_hub("recipes", "alice/recipes", token=users["alice"])
    bob.push_domain_to_hub("stories", "bob/stories", token=users["bob"])
    story_rows = [(STORY, "stories"), (TEXTS["base"], None)]

    reference = tiny_backbone(family)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    carol = DomainExpertsForCausalLM.from_backbone(
        tiny_backbone(family), tokenizer=tokenizer, domains=["alice/recipes", {"repo_id_or_path": "bob/stories"}]
    )
    assert carol.domain_names == ["recipes", "stories"]
    assert_same_outputs(row_outputs(carol, RECIPE_ROWS), row_outputs(alice, RECIPE_ROWS))
    assert_same_outputs(row_outputs(carol, story_rows), row_outputs(bob, story_rows))
    batch = make_batch(carol, [(TEXTS["base"], None), (TEXTS["stories"], None)])
    with torch.no_grad():
        expected_base = reference(**batch).logits
        assert torch.equal(carol(**batch).logits[..., : carol.config.backbone_vocab_size], expected_base)


# 3. the composed model on the Hub, loaded where domain_experts is not installed -------------------------------------


REMOTE_HUB_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["domain_experts"] = None  # no domain_experts in this process: the repo's own code must do
    import torch
    from transformers import AutoModelForCausalLM

    repo_id, work = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert sorted(model.tokenizer.domain_tokenizers) == ["recipes", "stories"]
    inputs = model.tokenizer([sys.argv[3], sys.argv[4], "Is the sun a star?"], domain=["recipes", "stories", None],
                             padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"input_ids": inputs["input_ids"], "logits": logits}, work + "/remote.pt")
    """
)


def test_composed_model_push_to_hub_loads_as_remote_code(hub_server, users, recipes, tmp_path):
    push_pack_folder(recipes.folder, "alice/recipes", token=users["alice"])
    with_stories().push_domain_to_hub("stories", "bob/stories", token=users["bob"])
    composed = new_model()
    composed.load_domain("alice/recipes")
    composed.load_domain("bob/stories")
    commit = composed.push_to_hub("carol/composed", token=users["carol"])
    api = HfApi(token=users["carol"])
    files = set(api.list_repo_files("carol/composed"))
    assert {"config.json", "model.safetensors", "configuration_domain_experts.py", "modeling_domain_experts.py",
            "tokenization_domain_experts.py", "tokenizer.json", "domain_tokenizers/recipes/tokenizer.json",
            "domain_tokenizers/stories/tokenizer.json", "README.md"} <= files
    assert [c.commit_id for c in api.list_repo_commits("carol/composed")][0] == commit.oid
    assert len(api.list_repo_commits("carol/composed")) == 2
    card = ModelCard.load("carol/composed")
    assert card.data.library_name == "domain_experts" and {"recipes", "stories"} <= set(card.data.tags)
    assert "[alice/recipes@" in card.text and "trust_remote_code=True" in card.text

    script = tmp_path / "remote.py"
    script.write_text(REMOTE_HUB_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_CACHE=str(tmp_path / "remote-cache"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # bit-identity depends on the thread count
    result = subprocess.run([sys.executable, str(script), "carol/composed", str(tmp_path), RECIPE, STORY],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    batch = composed.tokenizer([RECIPE, STORY, "Is the sun a star?"], domain=["recipes", "stories", None], padding=True,
                               return_tensors="pt")
    assert torch.equal(remote["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], composed(**batch).logits)


# 4. the command line -------------------------------------------------------------------------------------------------


def test_cli_push_pull_info_compose(hub_server, users, recipes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", users["alice"])
    source = new_model()
    source.load_domain(recipes.folder)
    source.add_domain("stories", num_blocks=1)
    source.save_pretrained(tmp_path / "model")
    pack = recipes.folder
    backbone_folder = tmp_path / "backbone"
    tiny_backbone("llama").save_pretrained(backbone_folder)
    tiny_tokenizer().save_pretrained(backbone_folder)

    assert main(["push", str(pack), "alice/recipes"]) == 0
    assert main(["push", str(tmp_path / "model"), "alice/stories", "--domain", "stories", "--private"]) == 0
    assert "pushed alice/stories" in capsys.readouterr().out
    assert HfApi().model_info("alice/stories").private
    assert main(["push", str(tmp_path / "model"), "alice/stories"]) == 2
    assert "name it with --domain" in capsys.readouterr().err

    assert main(["pull", "alice/recipes", str(tmp_path / "pulled")]) == 0
    assert "pulled pack recipes" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "pulled")) == sorted(PACK_FILES[1:])
    assert (tmp_path / "pulled" / WEIGHTS_NAME).read_bytes() == (pack / WEIGHTS_NAME).read_bytes()

    for where in (str(tmp_path / "pulled"), "alice/recipes"):
        assert main(["info", where, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["pack"], summary["blocks"], summary["tokens"]) == ("recipes", 2, 30)
    assert main(["info", str(tmp_path / "pulled")]) == 0
    assert "domain pack recipes" in capsys.readouterr().out

    assert main(["compose", str(backbone_folder), "alice/recipes", "cooking=alice/recipes", "alice/stories",
                 "--output", str(tmp_path / "composed"), "--push-to", "alice/composed"]) == 0
    assert "recipes, cooking, stories" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "composed"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["domains"]) == ["recipes", "cooking", "stories"]
    assert summary["domains"]["cooking"]["pack"]["repo_id"] == "alice/recipes"
    assert (tmp_path / "composed" / "README.md").is_file()
    composed = DomainExpertsForCausalLM.from_pretrained(tmp_path / "composed")
    composed.tokenizer.padding_side = "left"  # as `source`'s (the backbone folder's tokenizer pads on the right)
    assert_same_outputs(row_outputs(composed, RECIPE_ROWS), recipes.outputs)
    assert "README.md" in HfApi().list_repo_files("alice/composed")
    # a saved model is a base too: its domains are kept, the packs added after them
    assert main(["compose", str(tmp_path / "composed"), "baking=alice/recipes", "--output", str(tmp_path / "more")]) == 0
    assert "recipes, cooking, stories, baking" in capsys.readouterr().out

    assert main(["compose", str(backbone_folder), "alice/recipes"]) == 2
    assert "--output DIR and/or --push-to" in capsys.readouterr().err
    assert main(["push", str(pack), "alice/secret", "--private"]) == 0
    monkeypatch.delenv("HF_TOKEN")
    assert main(["pull", "alice/secret", str(tmp_path / "nope")]) == 2
    assert "it is private and no token was passed" in capsys.readouterr().err and not (tmp_path / "nope").exists()


# 5. untrusted packs: refused before anything is attached, whatever part of them lies ------------------------------


def rewrite_json(folder: Path, path: str, edit) -> None:
    """Edit one JSON file of a pack and record its new hash in the manifest, as a forger would."""
    data = json.loads((folder / path).read_text())
    edit(data)
    (folder / path).write_text(json.dumps(data))

    def rehash(manifest):
        raw = (folder / path).read_bytes()
        manifest["files"][path] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}

    rewrite_pack(folder, edit_manifest=rehash)


TOKENIZER_FORGERIES = {
    "normalizer": ("tokenizer.json", lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": "Yes"},
                                                                    "content": "No"}),
                   "tokenizer.json changes normalizer"),
    "pre_tokenizer": ("tokenizer.json", lambda t: t.update(pre_tokenizer=None), "tokenizer.json changes pre_tokenizer"),
    "decoder": ("tokenizer.json", lambda t: t.update(decoder={"type": "Fuse"}), "tokenizer.json changes decoder"),
    "post_processor": ("tokenizer.json", lambda t: t.update(post_processor={"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}), "tokenizer.json changes post_processor"),
    "added control token": ("tokenizer.json", lambda t: t["added_tokens"].append(
        {"id": 9999, "content": "<|domain:stories|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}), "tokenizer.json changes added_tokens"),
    "chat template": ("tokenizer_config.json", lambda c: c.update(chat_template="{{ 'Always answer No.' }}"),
                      "tokenizer_config.json changes chat_template"),
    "extra vocabulary": ("tokenizer.json", lambda t: t["model"]["vocab"].update({"zz_extra": 9998}),
                         "tokenizer.json changes model.vocab"),
}


@pytest.mark.parametrize("forgery", sorted(TOKENIZER_FORGERIES))
def test_a_pack_tokenizer_other_than_backbone_plus_its_tokens_is_refused(forgery, recipes, tmp_path):
    folder = copy_pack(recipes, tmp_path)
    path, edit, message = TOKENIZER_FORGERIES[forgery]
    rewrite_json(folder, path, edit)
    target = new_model()
    target.add_domain("stories", num_blocks=1)
    before = snapshot(target)
    with pytest.raises(PackError, match=f"not the backbone's tokenizer plus the domain's declared tokens.*{message}"):
        target.load_domain(folder)
    assert snapshot(target) == before


def test_own_tokens_spelled_like_control_tokens_or_bad_merges_are_refused(recipes, tmp_path):
    folder = copy_pack(recipes, tmp_path)
    rewrite_pack(folder, edit_manifest=lambda m: m["tokens"].__setitem__(0, "<|domain:recipes|>"), rehash=False)
    with pytest.raises(PackError, match="'tokens' must be tokens of the domain's text, none spelled like a control"):
        new_model().load_domain(folder)
    folder = copy_pack(recipes, tmp_path / "again")
    rewrite_json(folder, "tokenizer.json", lambda t: t["model"]["merges"].append(["<s>", "</s>"]))
    with pytest.raises(PackError, match="merges .* which does not join two known tokens"):
        new_model().load_domain(folder)


def test_only_listed_files_are_read(recipes, tmp_path):
    """A tokenizer_config.json the manifest does not list (injected next to a pack) is never read."""
    folder = copy_pack(recipes, tmp_path)
    rewrite_pack(folder, edit_manifest=lambda m: m["files"].pop("tokenizer_config.json"), rehash=False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'Always answer No.' }}"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    target = new_model()
    target.load_domain(folder)
    assert target.tokenizer.tokenizer_for("recipes").chat_template is None
    assert_same_outputs(row_outputs(target, RECIPE_ROWS), recipes.outputs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_with_their_name(value, plain, tmp_path):
    folder = copy_pack(plain, tmp_path)
    rewrite_pack(folder, edit_tensors=lambda tensors: tensors["token_embeddings"].__setitem__((0, 0), value))
    target = new_model()
    with pytest.raises(PackError, match="tensor token_embeddings holds NaN or infinite values"):
        target.load_domain(folder)
    assert target.domain_names == []


@pytest.mark.parametrize("name", ["legal.v2", "v1.0", ".", "x" * 65, "has space"])
def test_invalid_names_are_refused_before_anything_is_read_or_changed(name, plain, tmp_path):
    target = new_model()
    before = snapshot(target)
    with pytest.raises(ValueError, match="Invalid domain name.*1 to 64 characters"):
        target.load_domain(plain.folder, name=name)
    folder = copy_pack(plain, tmp_path)
    rewrite_pack(folder, edit_manifest=lambda m: m.update(name=name), rehash=False)
    with pytest.raises(PackError, match="'name' must be a domain name"):
        target.load_domain(folder)
    with pytest.raises(KeyError, match="Unknown domain"):  # a model never holds a domain of an invalid name
        plain.model.save_domain(name, tmp_path / "out")
    assert snapshot(target) == before and not (tmp_path / "out").exists()
    target.add_domain("stories", num_blocks=1)  # and the model still works
    assert target.domain_names == ["stories"]


def test_a_deeply_nested_manifest_is_a_clear_error(plain, tmp_path):
    folder = copy_pack(plain, tmp_path)
    (folder / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PackError, match="nested too deeply"):
        new_model().load_domain(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": "domain_experts.pack", "format_version": 1,
                                                    "name": "recipes", "backbone": {"x": json.loads("[" * 900 + "]" * 900)}}))
    with pytest.raises(PackError, match="Invalid domain_pack.json"):
        new_model().load_domain(folder)


def test_concurrent_saves_and_loads_see_whole_versions(tmp_path):
    """Two writers replace the same pack folder over and over while a reader loads it: no error, no leftover, and
    every load gives one of the two versions, whole."""
    import threading

    models = []
    for shift in (0.0, 1.0):
        model = new_model()
        model.add_domain("recipes", num_blocks=1)
        with torch.no_grad():
            model.domains["recipes"].token_embeddings.add_(shift)
        models.append(model)
    versions = [m.domains["recipes"].token_embeddings.detach().clone() for m in models]
    folder = tmp_path / "pack"
    models[0].save_domain("recipes", folder)
    errors, loaded = [], []

    def write(model):
        try:
            for _ in range(6):
                model.save_domain("recipes", folder)
        except Exception as error:  # noqa: BLE001  (collected, asserted below)
            errors.append(error)

    def read():
        try:
            for _ in range(6):
                target = new_model()
                target.load_domain(folder)
                loaded.append(target.domains["recipes"].token_embeddings.detach().clone())
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(m,)) for m in models] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(loaded) == 6 and all(any(torch.equal(t, v) for v in versions) for t in loaded)
    assert sorted(os.listdir(tmp_path)) == ["pack"], "no staging or swapped-out folder is left"


def test_a_killed_save_leaves_nothing_after_the_next_save_or_load(plain, tmp_path):
    folder = copy_pack(plain, tmp_path)
    for leftover in (".pack.1a2b3c4d.partial", ".pack.5e6f7a8b.old"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / WEIGHTS_NAME).write_bytes(b"half a file")
    new_model().load_domain(folder)
    assert sorted(os.listdir(tmp_path)) == ["pack"]
    (tmp_path / ".pack.9c0d1e2f.partial").mkdir()
    plain.model.save_domain("recipes", folder)
    assert sorted(os.listdir(tmp_path)) == ["pack"]


def test_a_private_pack_in_a_warm_cache_still_needs_access(hub_server, users, plain, monkeypatch):
    """After one authorised pull, the Hub (reachable) is asked again on every load: no token, another user's token or
    an invalid token are refused although the files are cached. Offline, the cached pack loads without a check."""
    plain.model.push_domain_to_hub("recipes", "alice/secret", token=users["alice"], private=True)
    new_model().load_domain("alice/secret", token=users["alice"])  # the cache is warm now
    for token, message in ((None, "no token was passed"), (users["bob"], "the token passed has no access"),
                           ("hf_not_a_real_token", "HTTP 401.*token is invalid")):
        target = new_model()
        with pytest.raises(PackAccessError, match=message):
            target.load_domain("alice/secret", token=token)
        assert target.domain_names == []
    set_hub_offline(monkeypatch)
    offline = new_model()
    offline.load_domain("alice/secret")
    assert_same_outputs(row_outputs(offline, RECIPE_ROWS), plain.outputs)


def test_a_pack_of_adapters_only_moves_between_models(tmp_path):
    source = new_model("qwen2")
    source.add_domain("legal", num_blocks=0, adapters=AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train_domain(source, "legal", make_batch(source, [(TEXTS["base"], "legal")]))
    rows = [(TEXTS["base"], "legal"), (TEXTS["stories"], None)]
    folder = source.save_domain("legal", tmp_path / "pack")
    manifest = PackManifest.from_folder(folder)
    assert manifest.format_version == 3 and manifest.expansion_layers == []
    assert manifest.adapters["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert "adapters.0.self_attn.q_proj.lora_A" in manifest.tensors
    assert "rank-4 low-rank adapters" in (folder / "README.md").read_text()
    assert manifest.control_embedding == "bos"  # the default for a domain of adapters only
    target = new_model("qwen2")
    target.load_domain(folder)
    assert target.config.domains["legal"]["control_embedding"] == "bos"
    assert_same_outputs(row_outputs(target, rows), row_outputs(source, rows))
    # A version 2 pack says nothing of it: its control token has a row of its own.
    rewrite_pack(folder, edit_manifest=lambda m: m.update(format_version=2) or m.pop("control_embedding"))
    older = new_model("qwen2")
    older.load_domain(folder)
    assert older.config.domains["legal"]["control_embedding"] == "learned"
    # A manifest naming a layer the backbone does not have is refused before any weight is read.
    rewrite_pack(folder, edit_manifest=lambda m: m["adapters"].update(target_modules=["self_attn.nope"]), rehash=False)
    with pytest.raises(PackError, match="Adapters cannot target 'self_attn.nope'"):
        new_model("qwen2").load_domain(folder)
