"""save_pretrained / from_pretrained, loading the saved folder as remote code where domain_experts is absent, and
models saved by earlier releases."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from backbones import FAMILIES, tiny_backbone, tiny_tokenizer
from conftest import TEXTS, make_batch, train_domain
from transformers import AutoModelForCausalLM

from domain_experts import DomainExpertsForCausalLM
from domain_experts.configuration_domain_experts import AdapterConfig, DomainExpertsConfig


REMOTE_CODE = ["configuration_domain_experts.py", "modeling_domain_experts.py", "tokenization_domain_experts.py"]
FIXTURES = Path(__file__).parent / "fixtures" / "release_0_1_0"


def trained_model(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2, corpus=[TEXTS["recipes"]] * 4, num_new_tokens=8,
                     adapters=AdapterConfig(r=2, layers=[0, 2]), control_embedding="bos")
    # Left untrained (its control token has a row of its own, the default with blocks): its blocks and adapters must load back as exact identities.
    model.add_domain("stories", expansion_layers=[1], adapters=AdapterConfig(r=2))
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    return model


ROWS = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], "stories")]


def test_save_writes_remote_code_weights_and_tokenizer(setup, tmp_path):
    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", *REMOTE_CODE} <= files
    assert (tmp_path / "domain_tokenizers" / "recipes" / "tokenizer.json").is_file()
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_domain_experts.DomainExpertsConfig",
        "AutoModelForCausalLM": "modeling_domain_experts.DomainExpertsForCausalLM",
    }


def _imports(tree: ast.AST):
    """(module, line, guarded) for every import in `tree`, nested ones included; `guarded` when it sits in a `try`
    that handles ImportError (an optional extra, imported where it is used)."""
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            handles_import_error = any(
                handler.type is not None and "ImportError" in ast.unparse(handler.type) for handler in node.handlers
            )
            for child in node.body:
                visit(child, guarded or handles_import_error)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or ""), node.lineno, guarded))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_imports_only_torch_transformers_and_each_other(name):
    """Every import of the remote-code files, indented ones included: torch, transformers, the standard library and the
    other remote-code files. The package's own extras (packs, the SmolLM2 loader) are imported only where they are
    used, in a `try` that turns their absence into a clear ImportError."""
    source = (Path(__file__).parents[1] / "src" / "domain_experts" / name).read_text()
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    siblings = {f".{file.removesuffix('.py')}" for file in REMOTE_CODE}
    for module, line, guarded in _imports(ast.parse(source)):
        if module in siblings or module.split(".")[0] in allowed:
            continue
        assert guarded and module.startswith("domain_experts"), f"{name}:{line} imports {module}"


def test_from_pretrained_restores_every_tensor_and_output(setup, tmp_path):
    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    loaded = DomainExpertsForCausalLM.from_pretrained(tmp_path)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    # transformers runs `_init_weights` on custom models while loading: nothing may be re-drawn or overwritten.
    for key in saved_state:
        assert torch.equal(saved_state[key], loaded_state[key]), key
    projections = loaded.architecture.identity_projections
    for block in loaded.domains["stories"].blocks["1"]:
        assert all(block.get_submodule(path).weight.abs().sum() == 0 for path in projections)
    assert loaded.domain_names == ["recipes", "stories"]
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert loaded.tokenizer is not None and loaded.tokenizer.base.split_special_tokens
    batch = make_batch(loaded, ROWS)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=6, do_sample=False),
                       model.generate(**inputs, max_new_tokens=6, do_sample=False))
    # Registered with the Auto classes: no remote code needed where the package is installed.
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is DomainExpertsForCausalLM


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["domain_experts"] = None  # `import domain_experts` fails in this process
    try:
        import domain_experts
        raise SystemExit("domain_experts must not be importable here")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.convert_tokens_to_ids("<|domain:recipes|>") == model.control_token_id("recipes")
        batch = torch.load(folder + "/batch.pt")
        assert torch.equal(model.tokenizer(batch["texts"], domain=batch["domains"], padding=True,
                                           return_tensors="pt")["input_ids"], batch["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=6, do_sample=False)
        text = model.tokenizer.batch_decode(generated, skip_special_tokens=True)
        torch.save({"logits": logits, "generated": generated, "text": text}, folder + "/remote_outputs.pt")
    """
)


def test_remote_code_loads_without_the_package_on_every_family(tokenizer, tmp_path):
    expected = {}
    for family in FAMILIES:
        model = DomainExpertsForCausalLM.from_backbone(tiny_backbone(family), tokenizer=tokenizer)
        model = trained_model((model, None))
        folder = tmp_path / family
        model.save_pretrained(folder)
        batch = make_batch(model, ROWS)
        torch.save({**batch, "texts": [t for t, _ in ROWS], "domains": [d for _, d in ROWS]}, folder / "batch.pt")
        with torch.no_grad():
            logits = model(**batch).logits
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=6, do_sample=False)
        expected[family] = (logits, generated, model.tokenizer.batch_decode(generated, skip_special_tokens=True))
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Same intra-op thread count as this process: float reductions, and so bit-identity, depend on it.
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, str(script), *(str(tmp_path / f) for f in FAMILIES)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    for family, (logits, generated, text) in expected.items():
        remote = torch.load(tmp_path / family / "remote_outputs.pt")
        assert torch.equal(remote["logits"], logits), family
        assert torch.equal(remote["generated"], generated), family
        assert remote["text"] == text, family


def test_checkpoint_missing_a_tensor_is_an_error_not_garbage(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["domains.recipes.token_embeddings"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*domains.recipes.token_embeddings"):
        DomainExpertsForCausalLM.from_pretrained(tmp_path)


def test_a_folder_that_is_not_a_saved_model_is_an_error_naming_what_it_is(tmp_path):
    """transformers reads a folder without config.json as an empty config, and another model type's with a warning;
    a backbone without its tokenizer files gets transformers' word about converting slow tokenizers."""
    tiny_backbone("llama").save_pretrained(tmp_path / "backbone")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_type").mkdir()
    (tmp_path / "no_type" / "config.json").write_text('{"hidden_size": 8}')
    for folder, found in [("backbone", "is a 'llama' model"), ("empty", "holds no config.json"),
                          ("no_type", "has a config.json without a model_type")]:
        for load in (DomainExpertsForCausalLM.from_pretrained, DomainExpertsConfig.from_pretrained):
            with pytest.raises(ValueError, match=f"{found}, not a saved DomainExperts model.*from_backbone"):
                load(tmp_path / folder)
    (tmp_path / "config.json").write_text("{}")
    for load in (DomainExpertsForCausalLM.from_pretrained, DomainExpertsConfig.from_pretrained):
        with pytest.raises(ValueError, match="config.json is a file: load the folder that"):
            load(tmp_path / "config.json")
    (tmp_path / "config.json").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "empty", "no_type"]  # nothing written
    with pytest.raises(ValueError, match="Cannot load the tokenizer of backbone.*tokenizer=tokenizer"):
        DomainExpertsForCausalLM.from_backbone(str(tmp_path / "backbone"))  # saved without its tokenizer


def test_a_backbone_that_is_not_one_is_an_error_naming_what_it_is(tmp_path):
    """A pack folder or an empty one (transformers: "Unrecognized model"), or a saved DomainExperts model (a TypeError
    after loading), given where a backbone is expected."""
    from domain_experts.evaluation import load_model

    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("recipes", num_blocks=1)
    model.save_pretrained(tmp_path / "model")
    model.save_domain("recipes", tmp_path / "pack")
    (tmp_path / "empty").mkdir()
    for folder in ("pack", "empty"):
        for load in (DomainExpertsForCausalLM.from_backbone, load_model):
            with pytest.raises(ValueError, match=f"{folder} holds no config.json: it is not a model folder.*load_domain"):
                load(str(tmp_path / folder))
    with pytest.raises(ValueError, match="is a saved DomainExperts model, not a backbone: load it with "
                                         "`DomainExpertsForCausalLM.from_pretrained`"):
        DomainExpertsForCausalLM.from_backbone(str(tmp_path / "model"))
    assert load_model(str(tmp_path / "model")).domain_names == ["recipes"]
    # a backbone kept in a subfolder is a model folder all the same
    tiny_backbone("llama").save_pretrained(tmp_path / "repo" / "backbone")
    tiny_tokenizer().save_pretrained(tmp_path / "repo" / "backbone")
    assert DomainExpertsForCausalLM.from_backbone(str(tmp_path / "repo"), subfolder="backbone").domain_names == []


def test_tokenizer_code_in_a_saved_folder_never_runs_unasked(tmp_path):
    model = DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer())
    model.add_domain("recipes", num_blocks=1)
    model.save_pretrained(tmp_path)
    marker = tmp_path / "ran.txt"
    (tmp_path / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = DomainExpertsForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists(), "the folder's tokenizer code ran without trust_remote_code"
    assert loaded.tokenizer is not None and type(loaded.tokenizer.base).__module__.startswith("transformers.")


# Models and packs saved by earlier releases --------------------------------------------------------------------------


def test_a_model_and_a_pack_saved_by_release_0_1_0_give_the_same_outputs():
    """tests/fixtures/release_0_1_0 was written by domain_experts 0.1.0 (see its make_fixtures.py)."""
    expected = torch.load(FIXTURES / "expected.pt")
    model = DomainExpertsForCausalLM.from_pretrained(FIXTURES / "model")
    model.tokenizer.padding_side = "left"
    batch = make_batch(model, expected["rows"])
    assert torch.equal(batch["input_ids"], expected["batch"]["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**expected["batch"]).logits, expected["logits"])
    inputs = {k: expected["batch"][k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected["generated"])

    composed = DomainExpertsForCausalLM.from_backbone(str(FIXTURES / "backbone"))
    composed.tokenizer.padding_side = "left"
    composed.load_domain(FIXTURES / "recipes_pack")
    recipes_rows = [row for row in expected["rows"] if row[1] == "recipes"]
    pack_batch = make_batch(composed, recipes_rows)
    with torch.no_grad():
        pack_logits = composed(**pack_batch).logits
    alone = make_batch(model, recipes_rows)
    with torch.no_grad():
        model_logits = model(**alone).logits
    V = model.config.backbone_vocab_size
    own = model.config.domains["recipes"]["token_ids"][1:]
    own_in_composed = composed.config.domains["recipes"]["token_ids"][1:]
    assert torch.equal(pack_logits[..., :V], model_logits[..., :V])
    assert torch.equal(pack_logits[..., own_in_composed], model_logits[..., own])


def test_an_unreachable_hub_name_fails_at_once_pointing_to_the_offline_backbone(monkeypatch):
    """No network: the Hub id is looked up in the cache only (no minutes of retries), and the error names the way out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OSError, match="(?s)Cannot load backbone 'someone/some-model'.*from_backbone\\(\"smollm2\"\\)"):
        DomainExpertsForCausalLM.from_backbone("someone/some-model")
