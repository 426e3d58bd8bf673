"""The README as a user meets it: CI runs exactly its test command, and every Python block runs as written.

The blocks run in order, each in a fresh Python process, in one working folder (a later block may use what an earlier
one saved, as a reader following the README would). Where a block lets the user choose the backbone (`"smollm2"`), a
tiny random backbone stands in for it; the Hub is a local server (tests/hub_server.py) where `alice` is logged in
(`HF_TOKEN`); the serving example talks to a `domain-experts serve` started on the model the Usage block saved.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from backbones import tiny_backbone, tiny_tokenizer


ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert command in README, "README's test command and .ci/run drifted apart"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not come up")


def test_every_python_block_runs_as_written(hub_server, tmp_path, monkeypatch):
    assert len(PYTHON_BLOCKS) >= 6, "the README's examples are Python blocks"
    backbone_folder = tmp_path / "tiny-backbone"
    tiny_backbone("llama").save_pretrained(backbone_folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    tokenizer.save_pretrained(backbone_folder)
    monkeypatch.setenv("HF_TOKEN", hub_server.add_user("alice"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), DOMAIN_EXPERTS_TEST_README="1")
    work = tmp_path / "work"
    work.mkdir()
    server = None
    try:
        for number, block in enumerate(PYTHON_BLOCKS, start=1):
            code = block.replace('"smollm2"', repr(str(backbone_folder)))
            if "OpenAI(" in code:
                port = free_port()
                server = subprocess.Popen(
                    [sys.executable, "-m", "domain_experts.cli", "serve", "smollm2-recipes", "--port", str(port)],
                    cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                wait_for_server(f"http://127.0.0.1:{port}", server)
                code = code.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
            script = tmp_path / f"block_{number}.py"
            script.write_text(code)
            result = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                                    timeout=600, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, f"README Python block {number}:\n{block}\n{result.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_the_readme_has_no_unfilled_placeholder():
    assert not re.findall(r"\b[A-Z_]{6,}_(?:RESULTS|TEXT)\b", README)


