"""The Accelerate training loop: resumable after SIGKILL, same result on 1 or 2 processes, clear errors first."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer
from safetensors.torch import load_file

from domain_experts import DomainExpertsForCausalLM
from domain_experts.data import corpus_path
from domain_experts.train import TrainingConfig, latest_checkpoint, save_checkpoint, train


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return folder


def train_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--domain", "recipes", "--add-domain", "--num-blocks", "2",
            "--new-tokens", "20", "--train-file", str(corpus_path("recipes", "validation")),
            "--output-dir", str(output_dir), "--block-size", "64", "--batch-size", "4", "--learning-rate", "1e-3",
            *extra]


def run_cli(args: list[str], launcher: list[str] | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = (launcher or [sys.executable]) + ["-m", "domain_experts.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def domain_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(output_dir / "model" / "model.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("domains.")}


def test_resume_after_sigkill_ends_with_the_same_weights(tiny_model_dir, tmp_path):
    steps = ["--max-steps", "14", "--checkpoint-steps", "2"]
    uninterrupted = run_cli(train_args(tiny_model_dir, tmp_path / "straight", *steps))
    killed_dir = tmp_path / "killed"
    killed = run_cli(train_args(tiny_model_dir, killed_dir, *steps))
    deadline = time.time() + 240
    while (latest_checkpoint(killed_dir) is None or latest_checkpoint(killed_dir).name < "checkpoint-00000004"):
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (killed_dir / "model").exists(), "killed mid-run"
    finish(run_cli(train_args(tiny_model_dir, killed_dir, *steps, "--resume")))
    finish(uninterrupted)
    resumed, straight = domain_tensors(killed_dir), domain_tensors(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in straight.items() if "o_proj" in k), "it trained"


def test_two_gloo_processes_match_one_process(tiny_model_dir, tmp_path):
    """K steps on 2 processes (each half of every global batch) against 1 process, same global batch.

    Gradients are the same sums taken in another order (DDP averages the two halves' mean losses, which hold the same
    number of target tokens), so weights agree to float32 rounding: after 4 AdamW steps of lr 1e-3 the differences are
    ~1e-7; 1e-5 leaves room while catching any real mismatch (a wrong batch split or unsynchronised step moves weights by
    ~lr = 1e-3).
    """
    steps = ["--max-steps", "4", "--control-token-dropout", "0.5"]
    single = run_cli(train_args(tiny_model_dir, tmp_path / "one", *steps))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run_cli(train_args(tiny_model_dir, tmp_path / "two", *steps), launcher=launcher)
    finish(single)
    output = finish(double)
    one, two = domain_tensors(tmp_path / "one"), domain_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    changed = [k for k in one if "o_proj" in k and one[k].abs().sum() > 0]
    assert changed, "training changed the domain"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    assert "Finished 4 steps" in output


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    first = save_checkpoint(accelerator, tmp_path, step=2, keep=2)
    assert latest_checkpoint(tmp_path) == first

    def dies_halfway(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerator, "save_state", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, step=4, keep=2)
    assert latest_checkpoint(tmp_path) == first
    assert json.loads((first / "trainer_state.json").read_text()) == {"completed_steps": 2}
    assert model.weight.shape == (2, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"text_column": "body"}, "no column 'body'.*columns are \\['text'\\]"),
        ({"block_size": 4096}, "block_size=4096 is larger than the backbone's context of 128"),
        ({"domain": "legal", "add_domain": False}, "Unknown domain 'legal'.*--add-domain"),
        ({"train_file": "empty"}, "training data is empty"),
        ({"train_file": "missing.jsonl"}, "No such data file"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(tiny_model_dir, tmp_path, change, message):
    if change.get("train_file") == "empty":
        (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
        change = {"train_file": str(tmp_path / "empty.jsonl")}
    config = TrainingConfig(output_dir=str(tmp_path / "out"), model=str(tiny_model_dir), domain="recipes",
                            add_domain=True, train_file=str(corpus_path("recipes", "validation")), block_size=64,
                            max_steps=1, batch_size=2)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(config)
    assert not (tmp_path / "out" / "run_config.json").exists(), "nothing written"


def test_resuming_another_run_is_an_error(tiny_model_dir, tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path), model=str(tiny_model_dir), domain="recipes", add_domain=True,
                            train_file=str(corpus_path("recipes", "validation")), block_size=64, max_steps=2,
                            batch_size=2, checkpoint_steps=2)
    train(config)
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        train(config)
    config.resume, config.learning_rate = True, 0.5
    with pytest.raises(ValueError, match="checkpoint of another run.*learning_rate"):
        train(config)
