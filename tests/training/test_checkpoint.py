"""Checkpoints: round trip (tied weights, optimizer, RNG), atomic replacement (a crash mid-write leaves the
previous checkpoint loadable), and clear errors for corrupt or incompatible files."""

import random

import pytest
import torch
from torch import nn

from companion.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class Net(nn.Module):
    def __init__(self, vocab: int = 9, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight


def trained(seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net.head(net.fc(net.emb(torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()
    return net, opt


def test_round_trip_weights_optimizer(tmp_path):
    net, opt = trained()
    path = save_checkpoint(tmp_path, net, opt, step=3, extra={"note": "hi"})
    other, other_opt = trained(seed=1)
    state = load_checkpoint(tmp_path, other, other_opt)
    assert path.name == "step-00000003" and state["step"] == 3 and state["note"] == "hi"
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other.head.weight is other.emb.weight  # still tied after loading
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_streams_continue(tmp_path):
    net, opt = trained()
    torch.manual_seed(7)
    random.seed(7)
    save_checkpoint(tmp_path, net, opt, step=1)
    after = (torch.rand(4), random.random())
    torch.manual_seed(123)
    random.seed(123)
    load_checkpoint(tmp_path, Net())
    assert torch.equal(torch.rand(4), after[0]) and random.random() == after[1]


def test_keep_and_latest(tmp_path):
    net, opt = trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, net, opt, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000002", "step-00000003"]
    assert load_checkpoint(tmp_path, Net())["step"] == 3


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    net, opt = trained()
    save_checkpoint(tmp_path, net, opt, step=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # fails after the weights were written to the temporary dir
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, net, opt, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000001"]  # no debris
    assert load_checkpoint(tmp_path, Net())["step"] == 1


def test_corrupt_weights_named(tmp_path):
    net, opt = trained()
    path = save_checkpoint(tmp_path, net, opt, step=1)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: sha256 [0-9a-f]{64} differs"):
        load_checkpoint(path, Net())


def test_truncated_state_named(tmp_path):
    net, opt = trained()
    path = save_checkpoint(tmp_path, net, opt, step=1)
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read training state .*state\.pt"):
        load_checkpoint(path, Net())


def test_incompatible_model_names_the_mismatch(tmp_path):
    net, opt = trained()
    save_checkpoint(tmp_path, net, opt, step=1)
    with pytest.raises(CheckpointError, match=r"model\.safetensors do not fit Net: shape mismatch \['emb.weight: "
                                              r"file \(9, 4\) vs model \(12, 4\)'"):
        load_checkpoint(tmp_path, Net(vocab=12))

    class Extra(Net):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

    with pytest.raises(CheckpointError, match=r"missing \['norm.weight', 'norm.bias'\]"):
        load_checkpoint(tmp_path, Extra())


def test_optimizer_mismatch_and_missing_checkpoint(tmp_path):
    net, opt = trained()
    save_checkpoint(tmp_path / "run", net, None, step=1)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "run", Net(), opt)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nowhere: expected model\.safetensors and state\.pt"):
        load_checkpoint(tmp_path / "nowhere", Net())
