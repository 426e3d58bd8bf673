"""save_pretrained / from_pretrained, and loading the saved folder as remote code where domain_experts is absent."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TEXTS, make_batch, train_domain
from transformers import AutoModelForCausalLM

from domain_experts import DomainExpertsForCausalLM


def trained_model(setup):
    model, _ = setup
    model.add_domain("recipes", num_blocks=2)
    model.add_domain("stories", expansion_layers=[1])  # left untrained: its blocks must load back as exact identities
    train_domain(model, "recipes", make_batch(model, [(TEXTS["recipes"], "recipes")]))
    return model


ROWS = [(TEXTS["recipes"], "recipes"), (TEXTS["base"], None), (TEXTS["stories"], "stories")]


def test_save_writes_remote_code_weights_and_tokenizer(setup, tmp_path):
    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    remote_code = ["configuration_domain_experts.py", "modeling_domain_experts.py", "tokenization_domain_experts.py"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", *remote_code} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_domain_experts.DomainExpertsConfig",
        "AutoModelForCausalLM": "modeling_domain_experts.DomainExpertsForCausalLM",
    }
    for name in remote_code:
        imports = [line.split()[1] for line in (tmp_path / name).read_text().splitlines()
                   if line.startswith(("import ", "from "))]
        allowed = {"torch", "transformers", ""} | set(sys.stdlib_module_names)  # "" is a relative import
        assert all(module.split(".")[0] in allowed for module in imports), imports


def test_from_pretrained_restores_every_tensor_and_output(setup, tmp_path):
    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    loaded = DomainExpertsForCausalLM.from_pretrained(tmp_path)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    # transformers runs `_init_weights` on custom models while loading: nothing may be re-drawn or overwritten.
    for key in saved_state:
        assert torch.equal(saved_state[key], loaded_state[key]), key
    for block in loaded.domains["stories"].blocks["1"]:
        assert all(p.abs().sum() == 0 for n, p in block.named_parameters() if "o_proj" in n or "c_proj" in n
                   or "down_proj" in n or n.endswith("dense.weight") or "dense_4h_to_h" in n)
    assert loaded.domain_names == ["recipes", "stories"]
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert loaded.tokenizer is not None and loaded.tokenizer.split_special_tokens
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

    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tokenizer.convert_tokens_to_ids("<|domain:recipes|>") == model.control_token_id("recipes")
    batch = torch.load(folder + "/batch.pt")
    with torch.no_grad():
        logits = model(**batch).logits
    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               max_new_tokens=6, do_sample=False)
    torch.save({"logits": logits, "generated": generated}, folder + "/remote_outputs.pt")
    """
)


def test_remote_code_loads_without_the_package(setup, tmp_path):
    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    batch = make_batch(model, ROWS)
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Same intra-op thread count as this process: float reductions, and so bit-identity, depend on it.
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote_outputs.pt")
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**batch).logits)
    expected = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=6, do_sample=False)
    assert torch.equal(remote["generated"], expected)


def test_checkpoint_missing_a_tensor_is_an_error_not_garbage(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    model = trained_model(setup)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["domains.recipes.token_embeddings"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*domains.recipes.token_embeddings"):
        DomainExpertsForCausalLM.from_pretrained(tmp_path)
