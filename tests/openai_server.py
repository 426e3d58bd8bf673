"""A real OpenAI-compatible server for the endpoint tests: `transformers serve` on 127.0.0.1, serving tiny models
saved by `save_canned_reply_model`, whose reply to any chat prompt is a string the test chose."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import torch
from backbones import tiny_tokenizer
from tokenizers import AddedToken
from transformers import LlamaConfig, LlamaForCausalLM


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_canned_reply_model(folder: str | os.PathLike, reply: str) -> None:
    """Save a tiny Llama and tokenizer (with a chat template) that answer every chat prompt with `reply`.

    `reply` is one added token. Every decoder layer writes nothing into the residual stream (zero output
    projections), so the logits at a position depend only on its token: the generation prompt `<|assistant|>`
    points to the reply token, and the reply token to EOS. Greedy and sampled decoding alike give `reply`.
    """
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|system|>", "<|assistant|>", "<|end|>"]})
    tokenizer.add_tokens([AddedToken(reply, normalized=False, special=False)])
    tokenizer.chat_template = CHAT_TEMPLATE
    assistant, reply_id = tokenizer.convert_tokens_to_ids(["<|assistant|>", reply])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings[:, :2] = 0  # dimensions 0 and 1 mark the two tokens that steer the reply
        embeddings[assistant] = 0
        embeddings[assistant, 0] = 1
        embeddings[reply_id] = 0
        embeddings[reply_id, 1] = 1
        model.lm_head.weight.zero_()
        model.lm_head.weight[reply_id, 0] = 30  # so strong that sampling at any usual temperature picks it too
        model.lm_head.weight[tokenizer.eos_token_id, 1] = 30
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OpenAIServer:
    """`transformers serve` in a subprocess on 127.0.0.1; models are requested by folder path."""

    def __init__(self, port: int | None = None, startup_timeout: float = 120.0):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def start(self) -> "OpenAIServer":
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", "cpu", "--log-level", "error"]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"openai_server_{self.port}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx2.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx2.TransportError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"transformers serve did not come up in {self.startup_timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
