"""The reference checkpoints in data/checkpoints load with one call (verified against the manifest's sha256)
and reach the validation loss recorded when they were trained by `python -m companion train`."""

import math

import pytest
import torch

from companion.training.recipes import REFERENCE_MODELS, load_pretrained, validation_loss


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_loads_and_reaches_its_recorded_loss(name):
    torch.set_num_threads(2)
    model, tokenizer, card = load_pretrained(name)
    assert not model.training and card["config_file"] == f"configs/{name}.json"
    loss = validation_loss(model, tokenizer, card)
    assert loss == pytest.approx(card["val_loss"], abs=1e-4)
    # and it learned something: a nat below a uniform guess (over the vocabulary, plus ln 2 for NSP's two classes)
    uniform = math.log(tokenizer.vocab_size) + (math.log(2) if card["task"] == "bert" else 0.0)
    assert loss < uniform - 1.0
