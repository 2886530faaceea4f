"""LoRA from scratch against its definition, a float64 merge, and PyPI ``peft`` on the same base layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from companion.finetuning.lora import (LoRAConfig, LoRALinear, apply_lora, count_trainable, load_lora,
                                       lora_layers, lora_state_dict, merge_lora, read_lora_config, save_lora,
                                       unload_lora, unmerge_lora)
from companion.models import GPT, GPTConfig, Llama, LlamaConfig

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 7, bias=bias)
        self.other = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(torch.tanh(self.proj(x)))


def _peft_pair(rank: int, alpha: float, rslora: bool, seed: int = 0):
    """Our model and peft's on the same base weights, A and B equal (B random, so the branch matters)."""
    torch.manual_seed(seed)
    base = Tiny().double()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                                                   lora_dropout=0.0, use_rslora=rslora))
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(rank=rank, alpha=alpha, targets=("proj",), rslora=rslora))
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # peft starts B at zero too; make the branch non-trivial
        ours.proj.lora_A.copy_(layer.lora_A["default"].weight)
        ours.proj.lora_B.copy_(layer.lora_B["default"].weight)
    return ours, theirs, layer


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_equal_peft(rslora: bool) -> None:
    ours, theirs, layer = _peft_pair(rank=4, alpha=6.0, rslora=rslora)
    assert ours.proj.scaling == pytest.approx(layer.scaling["default"], rel=0, abs=1e-15)
    assert ours.proj.scaling == pytest.approx(6.0 / (math.sqrt(4) if rslora else 4), rel=1e-15)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-12)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(ours.proj.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.proj.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=0, atol=1e-10)
    assert ours.proj.weight.grad is None and ours.other.weight.grad is None  # frozen, as in peft


def test_initialisation_matches_peft_distribution_and_leaves_output_unchanged() -> None:
    torch.manual_seed(0)
    base = Tiny()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=8, targets=("proj",)))
    x = torch.randn(4, 12)
    assert torch.equal(model(x), base(x))  # B = 0: exactly the base output
    assert torch.count_nonzero(model.proj.lora_B) == 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform_(a=sqrt(5)) on fan_in 12, as peft and nn.Linear
    a = model.proj.lora_A
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    torch.manual_seed(1)
    mine = LoRALinear(nn.Linear(512, 64), rank=16, alpha=16)
    torch.manual_seed(1)
    nn.Linear(512, 64)  # the same draws for the base layer
    expected = nn.init.kaiming_uniform_(torch.empty(16, 512), a=math.sqrt(5))
    torch.testing.assert_close(mine.lora_A, expected, rtol=0, atol=0)
    wide = nn.Sequential()
    wide.add_module("proj", nn.Linear(512, 64))
    theirs = peft.get_peft_model(wide, peft.LoraConfig(r=16, target_modules=["proj"]))
    a_peft = theirs.base_model.model.proj.lora_A["default"].weight
    bound = 1 / math.sqrt(512)  # U(-bound, bound): std bound / sqrt(3)
    for a in (mine.lora_A, a_peft):
        assert a.abs().max() <= bound and abs(a.std().item() / (bound / math.sqrt(3)) - 1) < 0.05


@pytest.mark.parametrize("rank,rslora", [(1, False), (4, True), (16, False)])
def test_trainable_parameter_count_equals_peft(rank: int, rslora: bool) -> None:
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, target_modules=["proj", "other"],
                                                                   use_rslora=rslora))
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(rank=rank, targets=("proj", "other"), rslora=rslora))
    assert count_trainable(ours) == theirs.get_nb_trainable_parameters()
    assert count_trainable(ours)[0] == rank * (12 + 7) + rank * (7 + 5)  # r (in + out) per layer


def test_modules_to_save_count_equals_peft() -> None:
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["proj"],
                                                                   modules_to_save=["other"]))
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(rank=2, targets=("proj",), modules_to_save=("other",)))
    assert count_trainable(ours)[0] == theirs.get_nb_trainable_parameters()[0] == 2 * 19 + 7 * 5 + 5


def test_merge_equals_unmerged_in_float64_and_unmerge_restores() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()).double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig.all_linear(rank=4, alpha=8.0))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    model.eval()
    idx = torch.randint(0, 256, (2, 16))
    before = model(idx)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-12)
    unmerge_lora(model)
    torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-12)
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-12)
    served = unload_lora(copy.deepcopy(model))
    assert not lora_layers(served) and type(served.blocks[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(served(idx), before, rtol=0, atol=1e-12)


def test_apply_lora_on_llama_targets_names_and_freezes() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())
    keys_before = set(model.state_dict())
    apply_lora(model, LoRAConfig.attention(rank=2))
    names = sorted(lora_layers(model))
    assert names == sorted(f"blocks.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"))
    assert keys_before <= set(model.state_dict())  # base keys unchanged: only lora_A/lora_B added
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    glob = apply_lora(Llama(LlamaConfig.tiny()), LoRAConfig(targets=("blocks.1.*",)))
    assert sorted(lora_layers(glob)) == [f"blocks.1.{p}" for p in ("ffn.down", "ffn.gate", "ffn.up",
                                                                  "self_attn.k_proj", "self_attn.out_proj",
                                                                  "self_attn.q_proj", "self_attn.v_proj")]


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 6), rank=2, alpha=2, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(10, 6)
    layer.eval()
    expected = x @ layer.weight.T + layer.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), expected)


def test_save_and_load_adapter_reproduce_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    base = GPT(GPTConfig.tiny())
    config = LoRAConfig(rank=4, targets=("q_proj", "v_proj"), modules_to_save=("lm_head",))
    model = apply_lora(copy.deepcopy(base), config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    path = save_lora(model, tmp_path / "adapter.safetensors", config)
    assert read_lora_config(path) == config
    stored = lora_state_dict(model, config.modules_to_save)
    assert len(stored) == 2 * 2 * 2 + 1 and "lm_head.weight" in stored  # 2 layers x (q, v) x (A, B) + head
    reloaded = load_lora(copy.deepcopy(base), path)
    idx = torch.randint(0, 256, (2, 10))
    model.eval(), reloaded.eval()
    assert torch.equal(reloaded(idx), model(idx))
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        lora_state_dict(model)


def test_error_paths(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"rank must be > 0, got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"rank must be > 0, got -2"):
        LoRALinear(nn.Linear(3, 3), rank=-2, alpha=1)
    with pytest.raises(ValueError, match="alpha must be"):
        LoRAConfig(alpha=0.0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="targets must be a tuple"):
        LoRAConfig(targets="q_proj")
    with pytest.raises(ValueError, match=r"no nn.Linear matched targets \('query',\).*blocks\.0\.self_attn\.q_proj"):
        apply_lora(GPT(GPTConfig.tiny()), LoRAConfig(targets=("query",)))
    with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] matched no module"):
        apply_lora(Tiny(), LoRAConfig(targets=("proj",), modules_to_save=("classifier",)))
    with pytest.raises(TypeError, match="plain nn.Linear"):
        LoRALinear(LoRALinear(nn.Linear(3, 3), rank=1, alpha=1), rank=1, alpha=1)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_state_dict(Tiny())
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        load_lora(Tiny(), plain)
