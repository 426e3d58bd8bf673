"""The Accelerate training loop: resumable after SIGKILL, same result on 1 or 2 processes, clear errors first."""

import json
import os
import re
import shutil
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
from domain_experts.modeling_domain_experts import DomainExpansion
from domain_experts.data import corpus_path, load_texts
from domain_experts.train import (TrainingConfig, latest_checkpoint, load_text_datasets, model_to_train, save_checkpoint,
                                  train)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    DomainExpertsForCausalLM.from_backbone(tiny_backbone("llama"), tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return folder


def train_args(model_dir: Path, output_dir: Path, *extra: str, new_tokens: bool = True) -> list[str]:
    return ["train", "--model", str(model_dir), "--domain", "recipes", "--add-domain", "--num-blocks", "2",
            *(["--new-tokens", "20"] if new_tokens else []),
            "--train-file", str(corpus_path("recipes", "validation")),
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
        ({"block_size": 4096, "new_tokens": [5]}, "block_size=4096 is larger than the backbone's context of 128"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"weight_decay": -0.1}, "--weight-decay, --warmup-steps and --max-grad-norm must be 0 or more"),
        ({"adapter_rank": -2}, "--adapter-rank and --num-blocks must be 0 or more"),
        ({"new_tokens": [5], "token_init_distill_length": 1}, "--token-init-distill-length must be at least 2"),
        ({"domain": "legal", "add_domain": False}, "Unknown domain 'legal'.*--add-domain"),
        ({"add_domain": False, "control_embedding": "bos"}, "--control-embedding configures a domain added with"),
        ({"train_file": "empty"}, "training data is empty"),
        ({"train_file": "missing.jsonl"}, "No such data file"),
        ({"validation_file": "/"}, r"/ is a folder: give a data file \(.jsonl"),
        ({"checkpoint_steps": -1}, "--eval-steps, --checkpoint-steps and --keep-checkpoints must be 0 or more"),
        ({"max_train_samples": 0}, "--max-train-samples must be at least 1"),
        ({"vocab_size": 100}, "--vocab-size sizes the tokenizer of a backbone pretrained with --preset"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(tiny_model_dir, tmp_path, monkeypatch, change, message):
    def no_token_start(*args, **kwargs):
        raise AssertionError("started a domain's tokens before checking the input")

    monkeypatch.setattr("domain_experts.token_init.add_domain_with_tokens", no_token_start)
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


def test_a_domain_of_adapters_is_adapters_alone_reading_its_control_token_as_bos(tiny_model_dir):
    """--adapter-rank alone gives LoRA's configuration (no blocks, the control token read as BOS); without it 4 blocks
    and a control row of its own; each can be chosen."""
    texts = {"recipes": load_texts("recipes", "validation")[:4]}
    for settings, blocks, control in [({"adapter_rank": 2}, 0, "bos"), ({}, 4, "learned"),
                                      ({"adapter_rank": 2, "num_blocks": 1, "control_embedding": "bos"}, 1, "bos")]:
        config = TrainingConfig(output_dir="unused", model=str(tiny_model_dir), domain="recipes", add_domain=True,
                                block_size=64, **settings)
        model, _ = model_to_train(config, texts)
        assert len(model.config.domains["recipes"]["expansion_layers"]) == blocks, settings
        assert model.config.domains["recipes"]["control_embedding"] == control, settings


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


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file, the row where known, and the fix; nothing written
# ----------------------------------------------------------------------------------------------------------------


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_DATA = {
    "empty": (".jsonl", b"", "is empty \\(0 bytes\\): give a file"),
    "blank lines only": (".jsonl", b"\n  \n", "holds only blank lines"),
    "not UTF-8": (".txt", "Crème brûlée\n".encode("latin-1"), "is not UTF-8 text \\(line 1\\).*iconv"),
    "not JSON": (".jsonl", b'{"text": "Soup"}\n{"text": Soup}\n',
                 "Line 2 of the .* is not JSON.*one JSON object per line"),
    "JSON list": (".jsonl", b'["Soup"]\n', "Line 1 of the .* is a JSON list, not an object"),
    "number as text": (".jsonl", b'{"text": "Soup"}\n{"text": 5}\n',
                       "Row 2 of the .* holds 5 \\(int\\).*must be a string"),
    "object as text": (".jsonl", b'{"text": {"title": "Soup"}}\n', "Row 1 of the .* holds .*\\(dict\\)"),
    "csv not parsable": (".csv", b'text\n"Soup\n', "Cannot read the .* as csv:.*Check the file's format"),
    "broken parquet": (".parquet", b"PAR1", "Cannot read the .* as parquet"),
    "no such column": (".jsonl", b'{"body": "Soup"}\n',
                       "has no column 'text'; its columns are \\['body'\\].*--text-column"),
    "one row": (".jsonl", b'{"text": "Soup"}\n',
                "has 1 row\\(s\\) with text: too few to hold out 5%.*--validation-file"),
    "unknown suffix": (".xml", b"<text>Soup</text>", "use a .jsonl, .json, .csv, .parquet, .txt file"),
}


@pytest.mark.parametrize("case, role", [(case, role) for case in BAD_DATA for role in ("training", "validation")
                                        if (case, role) != ("one row", "validation")])  # one validation row is fine
def test_bad_data_files_are_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, case, role):
    suffix, data, message = BAD_DATA[case]
    bad = write_bytes(tmp_path / f"bad{suffix}", data)
    good = corpus_path("recipes", "validation")
    files = ["--train-file", str(bad)] if role == "training" else ["--train-file", str(good), "--validation-file",
                                                                     str(bad)]
    from domain_experts.cli import main

    args = ["train", "--model", str(tiny_model_dir), "--domain", "recipes", "--add-domain", *files,
            "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]
    assert main(args) == 2
    printed = capsys.readouterr().err
    error = [line for line in printed.splitlines() if "error" in line]  # progress bars of the work done before it
    assert len(error) == 1 and error[0].startswith("domain-experts train: error: ") and "Traceback" not in printed
    assert str(bad) in error[0] and re.search(message, error[0]), error[0]
    if case not in ("one row", "unknown suffix"):
        assert f"{role} file" in error[0], error[0]
    assert not (tmp_path / "out").exists(), "nothing written"


def test_the_command_line_prints_no_traceback(tiny_model_dir, tmp_path):
    bad = write_bytes(tmp_path / "bad.jsonl", b'{"text": "Soup"}\nSoup\n')
    process = run_cli(["train", "--model", str(tiny_model_dir), "--domain", "recipes", "--add-domain", "--train-file",
                       str(bad), "--output-dir", str(tmp_path / "out")])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert output.strip().splitlines() == [
        f"domain-experts train: error: Line 2 of the training file {bad} is not JSON (Expecting value): a .jsonl file "
        "holds one JSON object per line."]


def test_a_missing_model_folder_is_named_as_such_before_any_work(tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path / "out"), model=str(tmp_path / "nope"), domain="recipes",
                            add_domain=True, train_file=str(corpus_path("recipes", "validation")))
    with pytest.raises(FileNotFoundError, match="No such model folder: .*nope"):
        train(config)


# ----------------------------------------------------------------------------------------------------------------
# A run folder: never trained over without --resume or --overwrite; resume only the same run
# ----------------------------------------------------------------------------------------------------------------


def small_config(model_dir: Path, output_dir: Path, **changes) -> TrainingConfig:
    settings = dict(output_dir=str(output_dir), model=str(model_dir), domain="recipes", add_domain=True,
                    train_file=str(corpus_path("recipes", "validation")), block_size=64, max_steps=4, batch_size=2,
                    learning_rate=1e-3)
    return TrainingConfig(**(settings | changes))


def test_a_finished_run_is_never_trained_over_without_overwrite(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(small_config(tiny_model_dir, run))  # no checkpoints: only the model shows the run finished
    model_file = run / "model" / "model.safetensors"
    first = model_file.read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run \\(its trained model\\).*--resume.*--overwrite"):
        train(small_config(tiny_model_dir, run, learning_rate=1e-2))
    assert model_file.read_bytes() == first, "the finished run's model is untouched"
    with pytest.raises(FileExistsError, match="has finished.*nothing to resume.*--overwrite"):
        train(small_config(tiny_model_dir, run, resume=True))
    train(small_config(tiny_model_dir, run, learning_rate=1e-2, overwrite=True))
    assert model_file.read_bytes() != first, "--overwrite trains it again"
    assert json.loads((run / "run_config.json").read_text())["settings"]["learning_rate"] == 1e-2


def test_a_folder_of_other_files_is_never_written_into(tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds no run_config.json: refusing"):
            train(small_config(tiny_model_dir, tmp_path, overwrite=overwrite))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run of 4 steps with checkpoints at steps 2 and 4, and its final domain tensors."""
    run = tmp_path_factory.mktemp("checkpointed") / "run"
    train(small_config(tiny_model_dir, run, checkpoint_steps=2))
    return run


def copy_run(run: Path, destination: Path, keep_model: bool = False) -> Path:
    """The run as a kill after its last checkpoint would leave it (without its final model)."""
    shutil.copytree(run, destination)
    if not keep_model:
        shutil.rmtree(destination / "model")
    return destination


def test_resume_refuses_changed_data_and_names_it(tiny_model_dir, checkpointed_run, tmp_path):
    data = tmp_path / "recipes.jsonl"
    data.write_text(corpus_path("recipes", "validation").read_text().replace("Title", "TITLE", 1))
    run = tmp_path / "run"
    train(small_config(tiny_model_dir, run, train_file=str(data), checkpoint_steps=2, max_steps=2))
    data.write_text(corpus_path("recipes", "validation").read_text())  # the same path, other texts
    with pytest.raises(ValueError, match=f"changed since it started \\(the training data \\({data}\\): sha256 "):
        train(small_config(tiny_model_dir, run, train_file=str(data), checkpoint_steps=2, max_steps=2, resume=True))


def test_a_damaged_run_config_is_a_clear_error(tiny_model_dir, checkpointed_run, tmp_path):
    run = copy_run(checkpointed_run, tmp_path / "run")
    (run / "run_config.json").write_text('{"format": 2, "settings": {')
    config_file = run / "run_config.json"
    with pytest.raises(ValueError, match=f"The run config {config_file} is damaged \\(not JSON.*--overwrite"):
        train(small_config(tiny_model_dir, run, checkpoint_steps=2, resume=True))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped byte": ("trainable.safetensors", flip_a_byte, "trainable.safetensors does not match the sha256"),
    "truncated": ("trainable.safetensors", truncate, "trainable.safetensors has .* bytes, not the .* written"),
    "missing optimizer state": ("optimizer.bin", Path.unlink, "optimizer.bin is missing"),
    "garbage trainer state": ("trainer_state.json", lambda p: p.write_bytes(b"{]" + b" " * (p.stat().st_size - 2)),
                              "trainer_state.json does not match"),
    "garbage manifest": ("checkpoint_manifest.json", lambda p: p.write_text("[1"),
                         "checkpoint_manifest.json is missing or damaged"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_moved_aside_for_the_newest_intact_one(tiny_model_dir, checkpointed_run, tmp_path,
                                                                       caplog, damage):
    file_name, spoil, reason = DAMAGE[damage]
    run = copy_run(checkpointed_run, tmp_path / "run")
    spoil(run / "checkpoints" / "checkpoint-00000004" / file_name)
    with caplog.at_level("WARNING"):
        train(small_config(tiny_model_dir, run, checkpoint_steps=2, resume=True))
    assert re.search(f"checkpoint-00000004 is damaged \\({reason}.*moved aside to damaged-checkpoint-00000004; "
                     "resuming from checkpoint-00000002", caplog.text), caplog.text
    assert (run / "checkpoints" / "damaged-checkpoint-00000004" / "checkpoint_manifest.json").exists() or (
        damage == "garbage manifest"), "moved aside, not deleted"
    resumed, straight = domain_tensors(run), domain_tensors(checkpointed_run)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_no_intact_checkpoint_is_a_clear_error(tiny_model_dir, checkpointed_run, tmp_path):
    run = copy_run(checkpointed_run, tmp_path / "run")
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / "optimizer.bin").unlink()
    with pytest.raises(ValueError, match="No intact checkpoint to resume from in .*checkpoint-00000004: optimizer.bin "
                                         "is missing / checkpoint-00000002: optimizer.bin is missing.*--overwrite"):
        train(small_config(tiny_model_dir, run, checkpoint_steps=2, resume=True))


def test_checkpoints_hold_only_trainable_tensors_and_resume_never_changes_the_backbone(tiny_model_dir, checkpointed_run,
                                                                                      tmp_path):
    checkpoint = checkpointed_run / "checkpoints" / "checkpoint-00000002"
    saved = load_file(checkpoint / "trainable.safetensors")
    assert saved and all(k.startswith("domains.recipes.") and "recipes.gate_" not in k for k in saved), sorted(saved)
    assert not list(checkpoint.glob("model*.safetensors")), "no frozen tensor in a checkpoint"
    manifest = json.loads((checkpoint / "checkpoint_manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in checkpoint.iterdir()} - {"checkpoint_manifest.json"}

    run = copy_run(checkpointed_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "checkpoint-00000004")
    train(small_config(tiny_model_dir, run, checkpoint_steps=2, resume=True))
    start = load_file(tiny_model_dir / "model.safetensors")
    resumed = load_file(run / "model" / "model.safetensors")
    backbone = [k for k in start if not k.startswith("domains.")]
    assert backbone and all(torch.equal(resumed[k], start[k]) for k in backbone)


def test_two_gloo_processes_match_one_process_without_new_tokens(tiny_model_dir, tmp_path):
    """Steps without the control token leave the domain's only embedding row unused: DDP must not stop there, and the
    validation loss counts every row once on any number of processes."""
    steps = ["--max-steps", "4", "--control-token-dropout", "0.5"]
    single = run_cli(train_args(tiny_model_dir, tmp_path / "one", *steps, new_tokens=False))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = run_cli(train_args(tiny_model_dir, tmp_path / "two", *steps, new_tokens=False), launcher=launcher)
    finish(single)
    finish(double)
    one, two = domain_tensors(tmp_path / "one"), domain_tensors(tmp_path / "two")
    assert "domains.recipes.token_embeddings" in one and one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    losses = [json.loads((tmp_path / name / "model" / "eval_results.json").read_text())["eval_loss"]
              for name in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_rows_without_text_are_left_out_saying_so(tmp_path, caplog):
    data = tmp_path / "recipes.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["Soup", "", "Stew", None, "  ", "Pie"]))
    config = TrainingConfig(output_dir=str(tmp_path / "out"), model="unused", domain="recipes", train_file=str(data),
                            validation_file=str(data))
    with caplog.at_level("WARNING"):
        ((domain, (train_rows, validation_rows)),) = load_text_datasets(config).items()
    assert domain == "recipes"
    assert train_rows["text"] == validation_rows["text"] == ["Soup", "Stew", "Pie"]
    assert caplog.text.count(f"({data}) has 3 of 6 rows without text in column 'text': they are left out.") == 2


def test_a_second_run_on_the_same_folder_stops_at_once(tiny_model_dir, tmp_path):
    from domain_experts.files import working_in_folder

    with working_in_folder(tmp_path / "run", "a training run"):  # as a first run in another process would
        with pytest.raises(OSError, match="run is in use by another process \\(a training run\\)"):
            train(small_config(tiny_model_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    train(small_config(tiny_model_dir, tmp_path / "run", max_steps=1))
    assert (tmp_path / "run" / "model" / "config.json").is_file()


# Several domains in one run -------------------------------------------------------------------------------------


def two_domain_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, corpus in (("recipes", "recipes"), ("tales", "stories")):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in load_texts(corpus, "validation")[:40]))
    return files


def test_domains_trained_together_match_each_trained_alone(tiny_model_dir, tmp_path):
    """Two domains in one run (every batch 2 rows of each), against each trained alone on its 2 rows per step: the
    same weights up to summation order. Blocks, adapters, own tokens, control-token dropout and clipping included."""
    files = two_domain_files(tmp_path)
    common = dict(model=str(tiny_model_dir), add_domain=True, num_blocks=1, adapter_rank=2, new_tokens=10,
                  block_size=32, max_steps=3, learning_rate=5e-3, max_grad_norm=0.05, control_token_dropout=0.5)
    together = train(TrainingConfig(output_dir=str(tmp_path / "together"), batch_size=4,
                                    domain=[f"{name}={path},{path}" for name, path in files.items()], **common))
    assert together.domain_names == ["recipes", "tales"]
    eval_results = json.loads((tmp_path / "together" / "model" / "eval_results.json").read_text())
    assert {"eval_loss_recipes", "eval_loss_tales"} <= eval_results.keys()
    for name, path in files.items():
        alone = train(TrainingConfig(output_dir=str(tmp_path / name), batch_size=2, domain=[f"{name}={path},{path}"],
                                     **common))
        expected = alone.domains[name].state_dict()
        got = together.domains[name].state_dict()
        assert expected.keys() == got.keys()
        # Zero at the start (identity blocks, fresh adapters): not zero once trained.
        trained = [key for key, tensor in expected.items() if ("lora_B" in key or "o_proj" in key) and tensor.any()]
        assert any("lora_B" in key for key in trained) and any("o_proj" in key for key in trained), "it trained"
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")


def test_several_domains_need_their_own_files_and_a_fitting_batch(tiny_model_dir, tmp_path):
    files = two_domain_files(tmp_path)
    base = dict(output_dir=str(tmp_path / "out"), model=str(tiny_model_dir), add_domain=True, block_size=32,
                max_steps=1, batch_size=4)
    for changes, message in [
        ({"domain": ["recipes", "tales"], "train_file": str(files["recipes"])}, "Several domains each need their own"),
        ({"domain": [f"recipes={files['recipes']}", "tales"]}, "Give every --domain its own files"),
        ({"domain": [f"recipes={files['recipes']}"], "train_file": str(files["recipes"])}, "and no --train-file"),
        ({"domain": [f"recipes={files['recipes']}", f"tales={files['tales']}"], "batch_size": 3},
         "must be a multiple of the 2 domains"),
        ({"domain": [f"recipes={files['recipes']}", f"recipes={files['tales']}"]}, "--domain recipes is given twice"),
        ({"domain": ["legal.v2=" + str(files["recipes"])]}, "Invalid domain name 'legal.v2'"),
        ({"domain": ["recipes="]}, "names no training file"),
        ({"domain": ["recipes"], "train_file": str(files["recipes"]), "add_domain": False, "adapter_rank": 4},
         "configure domains added with --add-domain"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(TrainingConfig(**(base | changes)))
    assert not (tmp_path / "out").exists()


def test_tokens_of_its_own_are_chosen_on_validation_and_their_story_is_saved(tiny_model_dir, tmp_path):
    """`--new-tokens` twice: both numbers are tried on the validation file before training; the saved model records
    what each read, the number kept and the training that followed."""
    model = train(small_config(tiny_model_dir, tmp_path / "run", new_tokens=[10, 30], token_init_distill_steps=4,
                               token_init_distill_length=16, validation_file=str(corpus_path("recipes", "test")),
                               max_eval_samples=10))
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["domains"]["recipes"]["token_init"]
    assert saved == model.config.domains["recipes"]["token_init"]
    assert set(saved["validation_bits_per_character"]) == {"none", "10", "30"}
    assert saved["new_tokens"] == len(model.config.domains["recipes"]["tokens"]) - 1
    if saved["new_tokens"]:
        assert (saved["settings"]["distill_steps"], saved["settings"]["distill_length"]) == (4, 16)
        assert saved["trained"] == [{"steps": 4, "learning_rate": 1e-3, "token_learning_rate": 1e-3,
                                     "block_size": 64, "batch_size": 2,
                                     "with": "the domain's blocks and adapters (domain_experts.train)"}]


def test_token_rows_train_at_their_own_learning_rate(tiny_model_dir, tmp_path):
    """--token-learning-rate applies to every row of the domain's tokens (input, output, biases, the control token's)
    and to nothing else: at a rate too small to move them, runs at two learning rates end with the same token rows
    and different blocks."""
    runs = {rate: train(small_config(tiny_model_dir, tmp_path / f"lr{rate}", new_tokens=[10], token_init="mean",
                                     learning_rate=rate, token_learning_rate=1e-30))
            for rate in (1e-3, 5e-3)}
    slow, fast = (runs[rate].domains["recipes"] for rate in (1e-3, 5e-3))
    names = [name for name in DomainExpansion.token_parameter_names if getattr(slow, name) is not None]
    assert "token_embeddings" in names and "output_embeddings" in names
    for name in names:
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=1e-20, msg=name)
    blocks = [key for key in slow.state_dict() if key.startswith("blocks.") and key.endswith("o_proj.weight")]
    assert blocks and all(not torch.equal(slow.state_dict()[key], fast.state_dict()[key]) for key in blocks)
    saved = json.loads((tmp_path / "lr0.001" / "model" / "config.json").read_text())["domains"]["recipes"]
    assert saved["token_init"]["trained"][0]["token_learning_rate"] == 1e-30
    with pytest.raises(ValueError, match="--token-learning-rate must be positive, got 0.0"):
        train(small_config(tiny_model_dir, tmp_path / "bad", token_learning_rate=0.0))
    with pytest.raises(ValueError, match="a backbone pretrained with --preset trains at --learning-rate"):
        train(TrainingConfig(output_dir=str(tmp_path / "bad"), preset="tiny", token_learning_rate=1e-3,
                             train_file=str(corpus_path("stories", "validation"))))
    assert not (tmp_path / "bad").exists()



def test_token_rows_are_clipped_apart_from_the_blocks_and_adapters(tiny_model_dir, tmp_path, monkeypatch):
    """A domain's token rows (its control token's above all: the first position, where attention gathers) have
    gradients of a scale of their own; clipped with the blocks and adapters, they would set those's clipping. A run
    whose control row gets gradients a million times larger (a hook) ends with the same blocks and adapters."""
    import domain_experts.train as train_module

    model_to_train = train_module.model_to_train

    def with_larger_control_row_gradients(*args, **kwargs):
        model, tokenizers = model_to_train(*args, **kwargs)
        model.domains["recipes"].token_embeddings.register_hook(lambda grad: grad * 1e6)
        return model, tokenizers

    settings = dict(num_blocks=1, adapter_rank=2, max_grad_norm=1e-4)
    runs = {}
    for name in ("plain", "larger"):
        if name == "larger":
            monkeypatch.setattr(train_module, "model_to_train", with_larger_control_row_gradients)
        runs[name] = train(small_config(tiny_model_dir, tmp_path / name, **settings)).domains["recipes"].state_dict()
    trained = [key for key in runs["plain"] if key.startswith(("blocks.", "adapters."))]
    assert any("lora_B" in key and runs["plain"][key].any() for key in trained), "the adapters trained"
    for key in trained:
        torch.testing.assert_close(runs["larger"][key], runs["plain"][key], atol=1e-6, rtol=1e-4, msg=key)

def test_token_tolerance_decides_whether_tokens_that_start_worse_are_kept(tiny_model_dir, tmp_path):
    """A tiny random backbone reads no better with extra tokens: with a tolerance that large the best number is kept
    anyway, and the record says which tolerance decided; a negative one is refused before anything is written."""
    model = train(small_config(tiny_model_dir, tmp_path / "run", new_tokens=[10], token_init_distill_steps=2,
                               max_steps=1, token_tolerance=1e9))
    record = model.config.domains["recipes"]["token_init"]
    assert record["new_tokens"] == 10 == len(model.config.domains["recipes"]["tokens"]) - 1
    assert record["tolerance"] == 1e9 and record["validation_texts"] > 0
    with pytest.raises(ValueError, match="--token-tolerance must be 0 or more"):
        train(small_config(tiny_model_dir, tmp_path / "bad", new_tokens=[10], token_tolerance=-0.5))
    assert not (tmp_path / "bad").exists()
