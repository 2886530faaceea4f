"""Sequence classification: padding-aware pooling (a padded row = the row alone), the three training modes, the
collator, metrics against scikit-learn, training with the Trainer, and save/load giving identical logits."""

from __future__ import annotations

import copy

import pytest
import torch
from dataclasses import replace
from sklearn.metrics import accuracy_score, f1_score

from companion.finetuning.classification import (ClassificationCollator, ClassifierConfig, SequenceClassifier,
                                                 accuracy_and_macro_f1, classification_eval_fn,
                                                 classification_loss, classifier_state_dict, load_classifier,
                                                 predict, read_classifier_config, save_classifier)
from companion.finetuning.lora import LoRAConfig, count_trainable, lora_layers
from companion.models import GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig
from companion.training import TrainConfig, Trainer


def backbone(kind: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = {"gpt": lambda: GPT(GPTConfig.tiny()), "llama": lambda: Llama(LlamaConfig.tiny()),
             "bert": lambda: Bert(BertConfig.tiny())}[kind]()
    return model.to(dtype).eval()


def encode(text: str) -> list[int]:
    return [3 + (ord(c) % 200) for c in text]


TEXTS = ["好评如潮", "差", "房间很干净，服务也好", "一般般吧"]


@pytest.mark.parametrize("kind,pooling", [("gpt", "last"), ("gpt", "mean"), ("llama", "last"), ("bert", "mean"),
                                          ("bert", "cls")])
def test_padded_rows_give_the_logits_of_the_row_alone(kind: str, pooling: str) -> None:
    model = SequenceClassifier(backbone(kind), ClassifierConfig(num_labels=3, pooling=pooling)).double().eval()
    with torch.no_grad():
        model.head.weight.normal_()
    collate = ClassificationCollator(encode, max_length=64, pad_id=0)
    batch = collate([{"text": t, "label": 0} for t in TEXTS])
    assert batch["input_ids"].shape == (4, 10) and batch["attention_mask"].sum(1).tolist() == [4, 1, 10, 4]
    logits = model(batch["input_ids"], batch["attention_mask"])  # (4, 3)
    for i, text in enumerate(TEXTS):
        alone = model(torch.tensor([encode(text)]))  # no padding at all
        torch.testing.assert_close(logits[i], alone[0], rtol=0, atol=1e-10)


def test_last_token_pooling_reads_the_decoder_features() -> None:
    gpt = backbone("gpt")
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(gpt.lm_head(gpt.features(ids)), gpt(ids), rtol=0, atol=0)  # features = forward - head
    llama = backbone("llama")
    torch.testing.assert_close(llama.lm_head(llama.features(ids)), llama(ids), rtol=0, atol=0)
    model = SequenceClassifier(gpt, ClassifierConfig())
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    torch.testing.assert_close(model.pooled(ids, mask), torch.stack([gpt.features(ids)[0, 6], gpt.features(ids)[1, 2]]))


def test_collator_truncates_to_the_context() -> None:
    collate = ClassificationCollator(encode, max_length=5, pad_id=7)
    batch = collate([{"text": "一二三四五六七八", "label": 1}, {"text": "好", "label": 0}])
    assert batch["input_ids"].tolist() == [encode("一二三四五"), encode("好") + [7] * 4]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]] and batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"examples \[1\] encode to no tokens"):
        collate([{"text": "好", "label": 0}, {"text": "", "label": 1}])


def test_modes_train_what_they_say() -> None:
    gpt = backbone("gpt", torch.float32)
    c, total = 64, sum(p.numel() for p in gpt.parameters())
    full = SequenceClassifier(copy.deepcopy(gpt), ClassifierConfig(mode="full"))
    assert count_trainable(full) == (total + 2 * c + 2, total + 2 * c + 2)
    head = SequenceClassifier(copy.deepcopy(gpt), ClassifierConfig(mode="head"))
    assert count_trainable(head)[0] == 2 * c + 2
    lora = SequenceClassifier(copy.deepcopy(gpt), ClassifierConfig(mode="lora", lora=LoRAConfig(rank=4)))
    assert lora.config.lora.modules_to_save == ("head",)
    assert len(lora_layers(lora)) == 2 * 4  # 2 blocks x q/k/v/o
    assert count_trainable(lora)[0] == 2 * 4 * 4 * (c + c) + 2 * c + 2
    # one optimizer step in head mode changes the head and nothing else
    batch = ClassificationCollator(encode, 64)([{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    classification_loss(head, batch).backward()
    opt.step()
    changed = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


def test_metrics_equal_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (50,), generator=g).tolist()
    p = torch.randint(0, 3, (50,), generator=g).tolist()
    got = accuracy_and_macro_f1(y, p, 3)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=[0, 1, 2], zero_division=0),
                                            abs=1e-12)
    never = accuracy_and_macro_f1([0, 0, 1, 1], [0, 0, 0, 0], 2)  # class 1 never predicted: its F1 is 0
    assert never["macro_f1"] == pytest.approx(f1_score([0, 0, 1, 1], [0, 0, 0, 0], average="macro",
                                                       zero_division=0), abs=1e-12)


def toy(n: int, seed: int) -> list[dict]:
    """Label 1 iff the text contains "好": learnable from the characters."""
    g = torch.Generator().manual_seed(seed)
    chars = "房间服务早餐位置价格前台一般差好"
    rows = []
    for i in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        text = "".join(chars[int(j)] for j in torch.randint(0, len(chars) - 1, (k,), generator=g))
        if i % 2:
            pos = int(torch.randint(0, k, (1,), generator=g))
            text = text[:pos] + "好" + text[pos:]
        rows.append({"text": text, "label": i % 2})
    return rows


def test_training_with_the_trainer_learns_and_restores_the_best_f1() -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(GPT(GPTConfig.tiny()), ClassifierConfig(mode="lora", lora=LoRAConfig(rank=4)))
    collate = ClassificationCollator(encode, model.n_ctx)
    val = toy(64, seed=1)
    eval_fn = classification_eval_fn(val, collate)
    before = eval_fn(model)["macro_f1"]
    config = TrainConfig(max_steps=60, batch_size=16, lr=1e-2, eval_every=10, metric="macro_f1", mode="max",
                         restore_best=True, weight_decay=0.0, progress=False, device="cpu", precision="fp32")
    trainer = Trainer(model, config, toy(256, seed=0), collate, classification_loss, eval_fn=eval_fn)
    history = trainer.fit()
    f1 = [r["macro_f1"] for r in history.eval]
    assert max(f1) > 0.9 > before  # the head + LoRA learn the cue
    assert trainer.best_step == history.eval[f1.index(max(f1))]["step"]
    assert eval_fn(model)["macro_f1"] == max(f1)  # the best weights are back
    labels, preds = predict(model, val, collate, batch_size=7)
    assert labels == [r["label"] for r in val] and len(preds) == 64


@pytest.mark.parametrize("mode", ["full", "head", "lora"])
def test_save_and_load_give_identical_logits(tmp_path, mode: str) -> None:
    base = backbone("gpt", torch.float32)
    config = ClassifierConfig(mode=mode, lora=LoRAConfig(rank=2, targets=("q_proj", "v_proj")) if mode == "lora"
                              else None)
    model = SequenceClassifier(copy.deepcopy(base), config)
    with torch.no_grad():  # as if trained
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_classifier(model, tmp_path / "clf.safetensors")
    assert read_classifier_config(path) == model.config
    keys = set(classifier_state_dict(model))
    if mode == "lora":
        assert keys == {"head.weight", "head.bias"} | {f"backbone.blocks.{i}.self_attn.{p}.lora_{ab}"
                                                        for i in range(2) for p in ("q_proj", "v_proj")
                                                        for ab in "AB"}
    elif mode == "head":
        assert keys == {"head.weight", "head.bias"}
    reloaded = load_classifier(copy.deepcopy(base), path).eval()
    batch = ClassificationCollator(encode, 64)([{"text": t, "label": 0} for t in TEXTS])
    model.eval()
    assert torch.equal(reloaded(batch["input_ids"], batch["attention_mask"]),
                       model(batch["input_ids"], batch["attention_mask"]))


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_labels must be an int >= 2, got 1"):
        ClassifierConfig(num_labels=1)
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassifierConfig(mode="adapter")
    with pytest.raises(ValueError, match="pooling must be one of"):
        ClassifierConfig(pooling="max")
    with pytest.raises(ValueError, match="only used with mode='lora'"):
        ClassifierConfig(mode="full", lora=LoRAConfig())
    with pytest.raises(ValueError, match="pooling='cls' needs a bidirectional encoder"):
        SequenceClassifier(backbone("gpt"), ClassifierConfig(pooling="cls"))
    with pytest.raises(TypeError, match="backbone must be a Bert or a decoder with features"):
        SequenceClassifier(torch.nn.Linear(3, 3), ClassifierConfig())
    model = SequenceClassifier(backbone("gpt"), ClassifierConfig())
    with pytest.raises(ValueError, match="at least one real token"):
        model(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        ClassificationCollator(encode, 0)
    assert replace(ClassifierConfig(mode="lora"), num_labels=3).lora.modules_to_save == ("head",)
