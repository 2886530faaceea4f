"""A tiny random GPT with a character tokenizer (with the chat markers), served over real HTTP on loopback."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from companion.models import GPT, GPTConfig, greedy_generate
from companion.serving import Engine, EngineConfig, ServerThread, create_app
from companion.tokenization import CharTokenizer

ALPHABET = ("床前明月光疑是地上霜举头望低思故乡春眠不觉晓处闻啼鸟"
            "夜来风雨声花落知多少，。abcdefgh")
SPECIALS = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"]
MODEL_ID = "tiny-gpt"


def tiny_model_and_tokenizer() -> tuple[GPT, CharTokenizer]:
    tokenizer = CharTokenizer(list(ALPHABET), SPECIALS)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=64, n_layers=2, d_model=32, n_heads=2)).eval()
    return model, tokenizer


def reference_text(model: GPT, tokenizer: CharTokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    """What greedy decoding gives for this prompt alone (the package's reference greedy loop), cut at <eos>."""
    eos = tokenizer.token_id("<eos>")
    out = greedy_generate(model, torch.tensor([prompt_ids]), max_tokens, eos_id=eos)[0, len(prompt_ids):].tolist()
    out = out[:out.index(eos)] if eos in out else out
    return tokenizer.decode([i for i in out if i not in tokenizer.special_tokens.values()])


class Slowed:
    """A copy of ``model`` whose first block sleeps ``delay`` seconds per call and counts the calls (one per
    decoding step), for cancellation and queue tests."""

    def __init__(self, model: torch.nn.Module, delay: float) -> None:
        self.model, self.delay, self.calls = copy.deepcopy(model), delay, 0
        self.model.blocks[0].register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        time.sleep(self.delay)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def serve(loader, config: EngineConfig = EngineConfig(max_tokens=48)) -> tuple[ServerThread, Engine]:
    engine = Engine(loader, MODEL_ID, config)
    return ServerThread(create_app(engine)), engine


@pytest.fixture(scope="module")
def server(tiny):
    thread, engine = serve(lambda: tiny)
    with thread:
        assert engine.wait_ready(30)
        yield thread, engine


@pytest.fixture
def gate():
    """An event the loader waits on (set it to let the model 'finish loading')."""
    event = threading.Event()
    yield event
    event.set()
