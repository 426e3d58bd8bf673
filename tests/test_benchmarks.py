"""The issue 7 and 14 comparison (benchmarks/compare_methods.py) runs in one go and resumes, at toy sizes: setting S end
to end, and setting M's procedure (learning rates chosen on validation, paired standard errors, the speed phase) on
setting S's tiny backbone instead of SmolLM2; the issue 15 benchmark (benchmarks/domain_tokenizers.py) on that backbone
too. The real runs are in README.

The runs of the scripts whole are marked `slow` (three minutes together: left out of the default `pytest`, run by CI);
the helpers' unit tests run by default."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
QUICK = ["--validation-texts", "2", "--gen-batch", "2", "--gen-tokens", "4", "--gen-repeats", "1", "--speed-rounds",
         "2", "--speed-steps", "1"]
TOY_S = ["--setting", "S", "--pretrain-steps", "4", "--scratch-steps", "2", "--s-steps", "2", "--s-new-tokens", "50",
         "--eval-texts", "2", *QUICK]
# Two rates for LoRA and the 4-block domain (each then extended once beyond the better one), one for the others.
TOY_M = ["--setting", "M", "--m-steps", "2", "--m-search-steps", "1", "--m-eval-texts", "3", "--lr-extend", "1",
         "--m-lr", "full_fine_tuning=1e-4", "--m-lr", "lora=1e-3,3e-3", "--m-lr", "domain_blocks=1e-3,3e-3",
         "--m-lr", "domain_adapters=1e-3", "--m-lr", "domain_blocks_adapters=1e-3", "--m-new-tokens", "40",
         *QUICK]


def compare_methods(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--work-dir", str(tmp_path / "work"),
               "--results-dir", str(tmp_path / "results"), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=600)


def backbone_of(tmp_path: Path) -> str:
    """Setting S's tiny stories backbone, which the setting M tests use instead of SmolLM2."""
    return str(tmp_path / "work" / "S" / "stories" / "model")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("compare_methods")
    run = compare_methods(tmp_path, *TOY_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path


@pytest.fixture(scope="module")
def setting_m(first_run) -> Path:
    run = compare_methods(first_run, *TOY_M, "--m-backbone", backbone_of(first_run))
    assert run.returncode == 0, run.stderr[-3000:]
    return first_run


@pytest.mark.slow
def test_setting_s_writes_every_method_and_target(first_run):
    result = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    assert list(result["rows"]) == ["backbone", "expansion", "expansion_no_extension", "full_fine_tuning", "lora",
                                    "scratch"]
    assert len(result["targets"]) == 5
    # The core promise holds whatever the training did: this target cannot be missed.
    assert result["targets"]["expansion forgets nothing on stories (bit-identical logits)"]["met"]
    for key, row in result["rows"].items():
        assert set(row["generation"]["samples"]) == {"stories", "recipes"}
        if key not in ("backbone", "scratch"):  # timed side by side in the speed phase: 2 rounds of 1 step
            assert len(row["train_step_seconds"]) == 2 and row["train_tokens_per_second"] > 0
    table = (first_run / "results" / "compare_methods_S.md").read_text()
    assert "| (d) expansion, 4 blocks, no tokenizer extension |" in table
    assert (first_run / "results" / "compare_methods_S.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_resume_keeps_measured_methods_and_refuses_other_settings(first_run):
    before = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    resumed = compare_methods(first_run, *TOY_S, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("Resuming: keeping the rows of expansion, expansion_no_extension, full_fine_tuning, lora, scratch"
            in resumed.stderr)
    assert "Pretraining the stories backbone" not in resumed.stderr
    assert "Speed phase" not in resumed.stderr
    assert "Measuring (" not in resumed.stderr and "trained from scratch on recipes" not in resumed.stderr  # no method
    after = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    assert after["rows"]["lora"] == before["rows"]["lora"]
    assert after["rows"]["scratch"] == before["rows"]["scratch"]

    other = compare_methods(first_run, *TOY_S, "--resume", "--s-steps", "3")
    assert other.returncode != 0 and "resume with the same flags" in other.stderr


@pytest.mark.slow
def test_setting_m_chooses_learning_rates_on_validation(setting_m):
    result = json.loads((setting_m / "results" / "compare_methods_M.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["backbone", "full_fine_tuning", "lora", "domain_blocks", "domain_adapters",
                          "domain_blocks_adapters", "domain_tokens"]
    for key, grid in (("lora", [1e-3, 3e-3]), ("domain_blocks", [1e-3, 3e-3])):
        search = {float(rate): bpc for rate, bpc in rows[key]["search"].items()}
        # One of two rates is always at an edge: the next lattice rate beyond the better one was tried.
        beyond = 1e-2 if search[3e-3] < search[1e-3] else 3e-4
        assert sorted(search) == sorted(grid + [beyond])
        assert rows[key]["learning_rate"] == min(search, key=search.get)
    assert rows["domain_adapters"]["search"] is None and rows["domain_adapters"]["learning_rate"] == 1e-3
    # The domain with tokens of its own trains once, at the rate chosen for the same domain without them; its number
    # of tokens was chosen on validation (or none kept), as its record says.
    tokens = rows["domain_tokens"]
    assert tokens["search"] is None and tokens["learning_rate"] == rows["domain_blocks"]["learning_rate"]
    tried = tokens["token_init"]["validation_bits_per_character"]
    assert "none" in tried and len(tried) == 2 and tokens["new_tokens"] in (0, *map(int, set(tried) - {"none"}))
    # Routed adapters of LoRA's rank: LoRA's parameters, plus the control token's embedding row.
    hidden = json.loads((Path(backbone_of(setting_m)) / "config.json").read_text())["hidden_size"]
    assert rows["domain_adapters"]["trainable_parameters"] == rows["lora"]["trainable_parameters"] + hidden
    assert rows["domain_blocks_adapters"]["trainable_parameters"] == (
        rows["domain_blocks"]["trainable_parameters"] + rows["lora"]["trainable_parameters"])
    for row in list(rows.values())[1:]:
        assert len(row["per_text"]["recipes"]["bits"]) == 3 and row["standard_error"]["recipes"] > 0
        assert len(row["train_step_seconds"]) == 2
    paired = result["comparisons"]["domain_blocks_adapters - lora"]
    assert paired["standard_error"] > 0
    assert len(result["targets"]) == 4
    assert result["targets"]["every domain configuration forgets nothing on stories (bit-identical)"]["met"]
    table = (setting_m / "results" / "compare_methods_M.md").read_text()
    assert "Learning-rate search" in table and "| (d) domain, routed adapters of rank" in table


@pytest.mark.slow
def test_setting_m_resume_measures_only_what_is_missing(setting_m):
    state_path = setting_m / "work" / "M" / "rows.json"
    state = json.loads(state_path.read_text())
    chosen = state["rows"]["lora"]["learning_rate"]
    dropped = next(rate for rate in state["search"]["lora"] if float(rate) != chosen)
    del state["search"]["lora"][dropped], state["rows"]["lora"]
    state_path.write_text(json.dumps(state))

    resumed = compare_methods(setting_m, *TOY_M, "--m-backbone", backbone_of(setting_m), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained = re.findall(r"\([a-f]\) [^\n]*?: learning rate [0-9.e-]+, \d+ steps\.", resumed.stderr)
    rank = state["lora"]["rank"]
    assert trained == [f"(b) LoRA, rank {rank}, merged: learning rate {float(dropped):g}, 1 steps.",
                       f"(b) LoRA, rank {rank}, merged: learning rate {chosen:g}, 2 steps."]
    assert "Speed phase" not in resumed.stderr


@pytest.mark.slow
def test_text_by_text_bits_add_up_to_language_modeling(first_run, script):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domain_experts.data import load_texts
    from domain_experts.evaluation import language_modeling

    model = AutoModelForCausalLM.from_pretrained(backbone_of(first_run))
    model.tokenizer = AutoTokenizer.from_pretrained(backbone_of(first_run))
    texts = load_texts("recipes", "test")[:3] + ["a long text " * 300]  # one text cut to max_length
    measured = script.text_bits(model, texts, None, 128, "recipes")
    bpc, error = script.bpc_with_error(measured)
    assert bpc == pytest.approx(language_modeling(model, texts, None, max_length=128)["bits_per_character"], rel=1e-6)
    assert error > 0
    assert script.paired_difference(measured, measured) == (0.0, 0.0)


def test_standard_errors_and_rate_lattice(script):
    # Every text at the same bits per character: no spread, no error.
    assert script.bpc_with_error({"bits": [2.0, 4.0, 6.0], "characters": [1, 2, 3]}) == (2.0, 0.0)
    first = {"bits": [1.0, 2.0, 3.0, 5.0], "characters": [1, 1, 1, 1]}
    second = {"bits": [1.5, 2.5, 3.5, 5.5], "characters": [1, 1, 1, 1]}
    # A constant shift on every text is a certain difference, however much the texts vary.
    assert script.paired_difference(first, second) == (pytest.approx(-0.5), pytest.approx(0.0))
    assert script.bpc_with_error(first)[1] == pytest.approx((sum((b - 2.75) ** 2 for b in first["bits"]) / 3) ** 0.5
                                                            / 2)
    assert script.next_rate(1e-3, upward=True) == 3e-3 and script.next_rate(1e-3, upward=False) == 3e-4
    assert script.next_rate(3e-4, upward=True) == 1e-3


def domain_tokenizers(tmp_path: Path, backbone: str, *flags: str) -> dict:
    script = SCRIPT.with_name("domain_tokenizers.py")
    command = [sys.executable, str(script), "--backbone", backbone, "--corpora", "recipes", "--steps", "2",
               "--test-texts", "3", "--validation-texts", "3", "--gen-batch", "2", "--gen-tokens", "3",
               "--gen-repeats", "2", "--work-dir", str(tmp_path / "tokens"), "--results-dir", str(tmp_path / "out"),
               *flags]
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((tmp_path / "out" / "domain_tokenizers.json").read_text())["corpora"]["recipes"]


@pytest.mark.slow
def test_domain_tokenizers_chooses_the_token_learning_rate_on_validation(first_run, tmp_path):
    """Tokens kept (a tolerance that keeps any): the arm with them trains at each token learning rate, the one reading
    validation best is measured, and its record says which."""
    result = domain_tokenizers(tmp_path, backbone_of(first_run), "--new-tokens", "30", "--token-tolerance", "100",
                               "--token-learning-rates", "1e-3", "1e-2")
    assert result["new_tokens_chosen"] == 30
    tried = result["validation_bpc_after_training"]["with"]
    assert set(tried) == {"0.001", "0.01"}
    assert result["token_learning_rate_chosen"] == float(min(tried, key=tried.get))
    assert result["token_init"]["trained"][-1]["token_learning_rate"] == result["token_learning_rate_chosen"]
    assert result["tokens_per_character"]["domain"] < result["tokens_per_character"]["backbone"]
    markdown = (tmp_path / "out" / "domain_tokenizers.md").read_text()
    assert f"**{min(tried, key=tried.get)}: " in markdown
    # Generation timed again on the saved arms: only its numbers change.
    retimed = domain_tokenizers(tmp_path, backbone_of(first_run), "--retime-generation", "--gen-repeats", "3")
    assert retimed["generation"]["repeats"] == 3 and len(retimed["generation"]["seconds"]["with"]) == 3
    assert "--retime-generation" in retimed["generation_command"] and "--retime" not in retimed["command"]
    assert {k: v for k, v in retimed.items() if k not in ("generation", "generation_command")} == \
        {k: v for k, v in result.items() if k != "generation"}



def test_domain_tokenizers_keeps_the_corpora_a_run_does_not_measure(tmp_path, monkeypatch):
    """A run for stories leaves the recipes row of an earlier run, also one written before each corpus carried its own
    command (the committed results, in that older layout)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("domain_tokenizers", SCRIPT.with_name("domain_tokenizers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipes = json.loads((SCRIPT.parent / "results" / "domain_tokenizers.json").read_text())["corpora"]["recipes"]
    measured = {key: value for key, value in recipes.items() if key not in ("command", "args", "generation_command")}
    older = {"command": "python earlier-run", "args": recipes["args"], "corpora": {"recipes": measured}}
    (tmp_path / "domain_tokenizers.json").write_text(json.dumps(older))
    monkeypatch.setattr(module, "measure", lambda corpus, args: {**measured, "new_tokens_chosen": 0})
    monkeypatch.setattr(sys, "argv", ["domain_tokenizers.py", "--corpora", "stories", "--results-dir", str(tmp_path)])
    module.main()
    corpora = json.loads((tmp_path / "domain_tokenizers.json").read_text())["corpora"]
    assert list(corpora) == ["recipes", "stories"]
    assert corpora["recipes"] == {"command": "python earlier-run", "args": recipes["args"], **measured}
    assert corpora["stories"]["command"].endswith(f"--corpora stories --results-dir {tmp_path}")
    assert corpora["stories"]["args"]["corpora"] == ["stories"]
    markdown = (tmp_path / "domain_tokenizers.md").read_text()
    assert f"| recipes | {measured['new_tokens_chosen']} |" in markdown and "| stories | 0 |" in markdown
    tried = ", ".join(map(str, recipes["args"]["new_tokens"]))
    assert f"- recipes (numbers of tokens tried: {tried}): `python earlier-run`" in markdown
