"""The memory estimate against measured memory on the CPU.

Model states: the bytes of the real parameters, gradients and torch.optim.AdamW states after one step.
Activations: the bytes autograd saves for the backward, seen by `torch.autograd.graph.saved_tensors_hooks` (unique
storages, parameters excluded), for a plain forward and for one with `torch.utils.checkpoint` around every block.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from companion.models.counting import count_parameters
from companion.models.gpt import GPT, GPTConfig
from companion.models.llama import Llama, LlamaConfig
from companion.objectives import causal_lm_loss
from companion.training.memory import (
    PRECISIONS,
    MemoryEstimate,
    activation_bytes,
    block_activation_bytes,
    estimate_memory,
    format_gib,
    head_activation_bytes,
    matrix_parameters,
    memory_table,
    published_configs,
)

B, T = 2, 32
# The estimate is built tensor by tensor for this package's forward, so it should agree to the byte; the margin only
# leaves room for a PyTorch release that saves a tensor more or less (e.g. a different CPU attention kernel).
REL = 0.02


def tiny(kind: str, **overrides: object) -> GPTConfig | LlamaConfig:
    base = GPTConfig.tiny() if kind == "gpt" else LlamaConfig.tiny()
    return dataclasses.replace(base, **overrides)


def build(config: GPTConfig | LlamaConfig) -> nn.Module:
    torch.manual_seed(0)
    return GPT(config) if isinstance(config, GPTConfig) else Llama(config)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Recorder:
    """Unique storages of the tensors saved for backward (and of any tensor passed to `keep`), parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.storages.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self.keep, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Checkpointed(nn.Module):
    """Runs a block under non-reentrant activation checkpointing and records the input the checkpoint keeps."""

    def __init__(self, block: nn.Module, recorder: Recorder, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.block, self.recorder, self.inputs = block, recorder, inputs

    def forward(self, x: torch.Tensor, kv_cache: object = None) -> torch.Tensor:
        self.inputs.append(self.recorder.keep(x))  # held until the backward recomputes the block
        return checkpoint(self.block, x, use_reentrant=False)


def measure(config: GPTConfig | LlamaConfig, precision: str = "fp32", checkpointing: bool = False,
            fused_head: bool = False) -> int:
    """Bytes held for the backward of causal_lm_loss(model(idx), idx) (or of ``model(idx, labels=idx)``, the fused
    head), measured on a real forward."""
    model = build(config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    rec, inputs = Recorder(model), []
    if checkpointing:
        model.blocks = nn.ModuleList(Checkpointed(b, rec, inputs) for b in model.blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), rec.hooks():
        loss = model(idx, labels=idx) if fused_head else causal_lm_loss(model(idx), idx)
        if checkpointing:
            # The outer hooks see nothing inside a checkpoint: so far the recorder holds the head's tensors and the
            # block inputs. Recomputing a block saves what its plain forward saves, from the kept input.
            assert len(inputs) == config.n_layers
            model.blocks[0].block(inputs[0])
    loss.backward()  # the measured graph is a working one
    return rec.total


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
def test_model_states_equal_real_adamw_step(kind: str, precision: str) -> None:
    config = tiny(kind)
    model = build(config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    params = list(model.parameters())  # tied matrices appear once
    idx = torch.randint(0, config.vocab_size, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = causal_lm_loss(model(idx), idx)
    loss.backward()
    if precision == "bf16-pure":  # AdamW on float32 master copies; the bf16 model receives their values
        masters = [p.detach().float().requires_grad_() for p in params]
        for m, p in zip(masters, params):
            m.grad = p.grad.float()
        opt = torch.optim.AdamW(masters, lr=1e-3)
        opt.step()
        with torch.no_grad():
            for m, p in zip(masters, params):
                m.grad = None  # the float32 gradient is transient: made, used and freed parameter by parameter
                p.copy_(m)
        extra = tensor_bytes(masters)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
        opt.step()
        extra = 0
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    steps = [s["step"] for s in opt.state.values()]
    est = estimate_memory(config, B, T, precision=precision)
    assert est.weights == tensor_bytes(params)
    assert est.grads == tensor_bytes(p.grad for p in params)
    assert all(p.grad.dtype == p.dtype for p in params)  # autocast: float32 gradients of float32 parameters
    assert est.optimizer == tensor_bytes(states) + extra
    # Left out on purpose: AdamW's step counters, one float32 scalar per parameter tensor, not per parameter.
    assert tensor_bytes(steps) == 4 * len(params)


def linear_weights(model: nn.Module) -> int:
    """Parameters of the distinct nn.Linear weight matrices of a built model (a tied head counts once)."""
    unique = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() for w in unique.values())


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_matrix_parameters_are_the_linear_weights(kind: str) -> None:
    for tie in (False, True):
        config = tiny(kind, tie_embeddings=tie)
        assert matrix_parameters(config) == linear_weights(build(config))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
@pytest.mark.parametrize("backend", ["torch", "math"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_activations_match_saved_tensors(kind: str, backend: str, precision: str) -> None:
    config = tiny(kind, backend=backend)
    measured = measure(config, precision)
    estimate = activation_bytes(config, B, T, precision)
    if backend == "math" and precision == "bf16":
        # The estimate follows CUDA autocast, where softmax runs in float32 and the next matmul saves a bf16 copy of
        # the weights (4 + 2 bytes per score); CPU autocast keeps softmax in bf16 (2 bytes): 4 bytes per score less.
        scores = config.n_layers * B * config.n_heads * T * T
        assert estimate - measured == 4 * scores
    else:
        assert measured == pytest.approx(estimate, rel=REL)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_fused_head_saves_gradients_not_logits(kind: str, precision: str) -> None:
    config = tiny(kind, vocab_size=512)  # a vocabulary large enough for the log-softmax to dominate the head
    for checkpointing in (False, True) if precision != "bf16" else (False,):  # the hooks miss checkpointed copies
        measured = measure(config, precision, checkpointing, fused_head=True)
        estimate = activation_bytes(config, B, T, precision, checkpointing=checkpointing, fused_head=True)
        assert measured == pytest.approx(estimate, rel=REL)
    # d weight (V x C) is a fixed cost and the log-softmax grows with the tokens: the fused head saves memory once
    # B * T exceeds about C (here 64 tokens = C, so the two are level); for GPT-2 124M at 8 x 1024, 8x less.
    gpt2 = GPTConfig.gpt2_small()
    plain, fused = (head_activation_bytes(gpt2, 8, 1024, precision, fused_head=f) for f in (False, True))
    assert plain / fused > 8


def test_autocast_saves_a_bf16_copy_of_every_weight_matrix() -> None:
    config = tiny("gpt")
    measured = measure(config, "bf16")
    assert measured - activation_bytes(config, B, T, "bf16", weight_copies=False) == 2 * linear_weights(build(config))


def test_fp16_autocast_is_counted_like_bf16() -> None:
    config = tiny("llama")
    assert estimate_memory(config, B, T, precision="fp16") == estimate_memory(config, B, T, precision="bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_checkpointing_keeps_block_inputs_and_one_block(kind: str, precision: str) -> None:
    config = tiny(kind, n_layers=8)
    plain, kept = measure(config, precision), measure(config, precision, checkpointing=True)
    estimate = activation_bytes(config, B, T, precision, checkpointing=True)
    assert kept == pytest.approx(estimate, rel=REL)
    assert plain / kept > 4  # 8 blocks of about 20 C-wide tensors each become 8 inputs plus one block
    assert plain / kept == pytest.approx(activation_bytes(config, B, T, precision) / estimate, rel=REL)


def test_one_block_is_the_difference_of_two_depths() -> None:
    # Derivation independent of the head: adding a block adds exactly one block's saved tensors.
    for kind in ("gpt", "llama"):
        two, three = measure(tiny(kind, n_layers=2)), measure(tiny(kind, n_layers=3))
        assert three - two == block_activation_bytes(tiny(kind), B, T)


def test_zero_stages_shard_states_by_rank_count() -> None:
    config = LlamaConfig.llama2_7b()
    n = count_parameters(config)
    assert n % 8 == 0  # 6,738,415,616: the shards divide evenly
    for precision in PRECISIONS:
        s = [estimate_memory(config, 1, 2048, precision=precision, zero_stage=k, n_ranks=8) for k in range(4)]
        assert s[1].weights == s[0].weights and s[1].grads == s[0].grads
        assert s[1].optimizer * 8 == s[0].optimizer
        assert s[2].weights == s[0].weights and s[2].grads * 8 == s[0].grads and s[2].optimizer == s[1].optimizer
        assert s[3].weights * 8 == s[0].weights and s[3].grads == s[2].grads and s[3].optimizer == s[1].optimizer
        assert s[0].activations == s[1].activations == s[2].activations
        copies = 2 * matrix_parameters(config) if precision in ("bf16", "fp16") else 0
        assert s[3].activations == s[0].activations - copies  # FSDP gathers and frees the 16-bit copies per block
        one_rank = [estimate_memory(config, 1, 2048, precision=precision, zero_stage=k) for k in range(3)]
        assert one_rank[0] == one_rank[1] == one_rank[2]  # one rank: nothing to shard


def test_zero_padding_rounds_a_shard_up() -> None:
    config = GPTConfig.tiny()
    n = count_parameters(config)
    s3 = estimate_memory(config, 1, 16, precision="fp32", zero_stage=3, n_ranks=7)
    shard = math.ceil(n / 7)
    assert (s3.weights, s3.grads, s3.optimizer) == (shard * 4, shard * 4, shard * 8)


def test_zero_paper_figure_1() -> None:
    # Rajbhandari et al. (2020), Figure 1: Psi = 7.5B, N_d = 64, mixed-precision Adam: 120 GB, 31.4 GB, 16.6 GB and
    # 1.9 GB of model states per device. Per parameter: 16, 4 + 12/64, 2 + 14/64 and 16/64 bytes.
    config = LlamaConfig.llama2_7b()
    n = count_parameters(config)
    for stage, figure_gb in enumerate([120, 31.4, 16.6, 1.9]):
        e = estimate_memory(config, 1, 16, precision="bf16-pure", zero_stage=stage, n_ranks=64)
        per_param = (e.weights + e.grads + e.optimizer) / n
        assert per_param * 7.5 == pytest.approx(figure_gb, abs=0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"precision": "int8"}, "precision must be one of .* got 'int8'"),
        ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3, got 4"),
        ({"n_ranks": 0}, "n_ranks must be a positive int, got 0"),
        ({"seq_len": 65}, r"seq_len must be an int in \[2, n_ctx=64\].*got 65"),
        ({"seq_len": 1}, "got 1"),
    ],
)
def test_bad_input_names_the_value(kwargs: dict, match: str) -> None:
    args = {"batch_size": 1, "seq_len": 16} | kwargs
    batch_size, seq_len = args.pop("batch_size"), args.pop("seq_len")
    with pytest.raises(ValueError, match=match):
        estimate_memory(GPTConfig.tiny(), batch_size, seq_len, **args)


def test_other_configs_are_refused() -> None:
    with pytest.raises(TypeError, match="got dict"):
        estimate_memory({"d_model": 64}, 1, 16)  # type: ignore[arg-type]


def test_estimate_is_frozen_and_totals() -> None:
    e = estimate_memory(GPTConfig.tiny(), 2, 32, precision="fp32")
    assert e.total == e.weights + e.grads + e.optimizer + e.activations
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.weights = 0  # type: ignore[misc]
    assert format_gib(3 * 2**30) == "3.0 GiB" and format_gib(1.5 * 2**30, digits=2) == "1.50 GiB"


def test_published_sizes_and_table() -> None:
    configs = published_configs()
    params = {name: count_parameters(c) for name, c in configs.items()}
    assert params["GPT-2 124M"] == 124_439_808  # GPT2LMHeadModel, tied head counted once
    assert params["GPT-3 1.3B"] == pytest.approx(1.3e9, rel=0.03)
    assert params["Llama 2 7B"] == 6_738_415_616  # LlamaForCausalLM (Llama-2-7b-hf)
    assert params["Llama 2 70B"] == 68_976_648_192  # LlamaForCausalLM (Llama-2-70b-hf)
    rows = memory_table(batch_size=1, seq_len=2048)
    assert [r["model"] for r in rows] == list(configs)
    assert [r["seq_len"] for r in rows] == [1024, 2048, 2048, 2048]  # GPT-2's context is 1024
    for r in rows:
        fp32, bf16, ckpt, zero3 = (r[k] for k in list(r)[3:])
        assert isinstance(bf16, MemoryEstimate)
        assert fp32.weights + fp32.grads + fp32.optimizer == 16 * r["params"] == bf16.total - bf16.activations
        assert ckpt.activations < bf16.activations and zero3.total < ckpt.total
        assert zero3.weights + zero3.grads + zero3.optimizer == pytest.approx(2 * r["params"], rel=1e-6)
