"""The issue 7 benchmark runs in one go and resumes: setting S end to end at toy sizes (the real run is in README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
TOY = ["--setting", "S", "--pretrain-steps", "4", "--scratch-steps", "2", "--s-steps", "2", "--s-new-tokens", "50",
       "--eval-texts", "2", "--gen-batch", "2", "--gen-tokens", "4", "--gen-repeats", "1"]


def compare_methods(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *TOY, "--work-dir", str(tmp_path / "work"),
               "--results-dir", str(tmp_path / "results"), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=600)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("compare_methods")
    run = compare_methods(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path


def test_setting_s_writes_every_method_and_target(first_run):
    result = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    assert list(result["rows"]) == ["backbone", "expansion", "expansion_no_extension", "full_fine_tuning", "lora",
                                    "scratch"]
    assert len(result["targets"]) == 5
    # The core promise holds whatever the training did: this target cannot be missed.
    assert result["targets"]["expansion forgets nothing on stories (bit-identical logits)"]["met"]
    for row in result["rows"].values():
        assert set(row["generation"]["samples"]) == {"stories", "recipes"}
    table = (first_run / "results" / "compare_methods_S.md").read_text()
    assert "| (d) expansion, 4 blocks, no tokenizer extension |" in table
    assert (first_run / "results" / "compare_methods_S.png").read_bytes().startswith(b"\x89PNG")


def test_resume_keeps_measured_methods_and_refuses_other_settings(first_run):
    before = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    resumed = compare_methods(first_run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("Resuming: keeping the rows of expansion, expansion_no_extension, full_fine_tuning, lora, scratch"
            in resumed.stderr)
    assert "Pretraining the stories backbone" not in resumed.stderr
    assert "Measuring (" not in resumed.stderr and "trained from scratch on recipes" not in resumed.stderr  # no method
    after = json.loads((first_run / "results" / "compare_methods_S.json").read_text())
    assert after["rows"]["lora"] == before["rows"]["lora"]
    assert after["rows"]["scratch"] == before["rows"]["scratch"]

    other = compare_methods(first_run, "--resume", "--s-steps", "3")
    assert other.returncode != 0 and "resume with the same flags" in other.stderr
