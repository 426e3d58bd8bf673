"""A PEFT LoRA adapter imported as a routed domain: peft's logits on its rows, the backbone's on the others."""

import copy
import json

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer
from conftest import TEXTS, make_batch
from huggingface_hub import HfApi
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from domain_experts import DomainExpertsForCausalLM
from domain_experts.packs import IncompatibleBackboneError, PackError


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "gpt_neox": ["query_key_value"],
           "phi3": ["qkv_proj", "gate_up_proj"], "glm": ["o_proj", "gate_up_proj"], "starcoder2": ["v_proj", "c_fc"]}


def peft_adapter(family: str, folder, **lora):
    """A LoRA of random, nonzero weights on a tiny backbone of `family`, saved as peft saves it; and the peft model."""
    backbone = tiny_backbone(family)
    torch.manual_seed(1)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS[family], "init_lora_weights": False, **lora})
    peft_model = get_peft_model(copy.deepcopy(backbone), config).eval()
    peft_model.save_pretrained(folder)
    return peft_model


def new_model(family: str) -> DomainExpertsForCausalLM:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return DomainExpertsForCausalLM.from_backbone(tiny_backbone(family), tokenizer=tokenizer)


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_imported_adapter_gives_peft_logits_on_its_rows_only(family, use_rslora, tmp_path):
    peft_model = peft_adapter(family, tmp_path / "adapter", use_rslora=use_rslora)
    model = new_model(family)
    reference = tiny_backbone(family)
    assert model.load_peft_adapter(tmp_path / "adapter", name="legal") == "legal"
    assert model.config.domains["legal"]["adapters"]["r"] == 4 and model.config.domains["legal"]["expansion_layers"] == []
    batch = make_batch(model, [(TEXTS["recipes"], None), (TEXTS["stories"], None)])
    V = model.config.backbone_vocab_size
    with torch.no_grad():
        routed = model(**batch, domain_ids=torch.tensor([0, -1])).logits[..., :V]
        expected_peft = peft_model(**batch).logits
        expected_base = reference(**batch).logits
    torch.testing.assert_close(routed[0], expected_peft[0], atol=1e-5, rtol=0)
    assert not torch.allclose(expected_peft[0], expected_base[0], atol=1e-3), "the adapter changes the logits"
    assert torch.equal(routed[1], expected_base[1])

    # Saved as a pack, it loads elsewhere with the same outputs.
    model.save_domain("legal", tmp_path / "pack")
    other = new_model(family)
    other.load_domain(tmp_path / "pack")
    with torch.no_grad():
        assert torch.equal(other(**batch, domain_ids=torch.tensor([0, -1])).logits[..., :V], routed)


def rewrite_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "uses use_dora"),
    ({"bias": "all"}, "uses bias"),
    ({"modules_to_save": ["lm_head"]}, "uses modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "uses rank_pattern"),
    ({"init_lora_weights": "pissa"}, "changes the backbone's weights"),
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"task_type": "SEQ_CLS"}, "a domain is a causal LM adapter"),
    ({"base_model_name_or_path": "someone/other-model"}, "is a LoRA adapter of 'someone/other-model'"),
])
def test_unsupported_adapters_are_refused_and_nothing_changes(change, message, tmp_path):
    peft_adapter("llama", tmp_path / "adapter")
    rewrite_config(tmp_path / "adapter", **change)
    model = new_model("llama")
    model.backbone.config.name_or_path = "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises((PackError, IncompatibleBackboneError), match=message):
        model.load_peft_adapter(tmp_path / "adapter", name="legal")
    assert model.domain_names == [] and model.config.vocab_size == model.config.backbone_vocab_size


def test_adapters_on_embeddings_or_on_another_backbone_are_refused(tmp_path):
    peft_adapter("llama", tmp_path / "embeddings", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(PackError, match="adapts model.embed_tokens.*which is not a linear layer inside a decoder layer"):
        new_model("llama").load_peft_adapter(tmp_path / "embeddings")
    peft_adapter("llama", tmp_path / "some_layers", layers_to_transform=[1, 3])
    model = new_model("llama")
    model.load_peft_adapter(tmp_path / "some_layers")
    assert model.config.domains["some_layers"]["adapters"]["layers"] == [1, 3]
    peft_adapter("gpt2", tmp_path / "gpt2")  # it adapts transformer.h.*.attn.c_attn, which a Qwen2 model lacks
    with pytest.raises(PackError, match="routed adapters adapt self_attn.q_proj"):
        new_model("qwen2").load_peft_adapter(tmp_path / "gpt2")
    wider = tiny_backbone("llama").config
    wider.hidden_size, wider.intermediate_size, wider.head_dim = 64, 128, 16
    backbone = AutoModelForCausalLM.from_config(wider)
    with pytest.raises(IncompatibleBackboneError, match="does not fit this backbone's layers.*expected"):
        DomainExpertsForCausalLM.from_backbone(backbone).load_peft_adapter(tmp_path / "some_layers")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PackError, match="a pickle, which is never loaded"):
        new_model("llama").load_peft_adapter(tmp_path / "pickled")


def test_adapter_from_a_hub_repo(hub_server, tmp_path):
    token = hub_server.add_user("alice")
    peft_model = peft_adapter("llama", tmp_path / "adapter")
    api = HfApi(token=token)
    api.create_repo("alice/legal-lora")
    api.upload_folder(folder_path=tmp_path / "adapter", repo_id="alice/legal-lora")
    model = new_model("llama")
    assert model.load_peft_adapter("alice/legal-lora", token=token) == "legal-lora"
    assert model.config.domains["legal-lora"]["pack"]["peft_adapter"].startswith("alice/legal-lora@")
    batch = make_batch(model, [(TEXTS["base"], None)])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, domain_ids=torch.tensor([0])).logits[..., : model.config.backbone_vocab_size],
                                   peft_model(**batch).logits, atol=1e-5, rtol=0)
