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


@pytest.mark.slow
def test_reference_gpt_beats_chapter_2s_4gram_on_the_same_events():
    # chapter 2 (book/ch02_concepts/01_language_models.ipynb): five-character quatrains, one line at a time,
    # characters seen < 3 times in training are <unk>; its 4-gram Kneser-Ney model scores 126.6
    from companion.data import TANG_POEMS, read_jsonl, split_bucket
    from companion.lm_basics import NGramConfig, NGramLM
    from companion.poem_eval import comparable_perplexity

    torch.set_num_threads(2)
    rows = read_jsonl(TANG_POEMS)

    def lines(split):
        return [list(line) for row in rows if row["form"] == "五言绝句"
                and split_bucket(row["text"], 0.05, 0.05) == split for line in row["text"].split("\n")]

    train, valid = lines("train"), lines("validation")
    four_gram = NGramLM(NGramConfig(order=4, smoothing="kneser_ney", min_count=3)).fit(train)
    assert round(four_gram.perplexity(valid), 1) == 126.6  # the number chapter 2 prints
    model, tokenizer, _ = load_pretrained("tang_gpt")
    assert comparable_perplexity(model.double(), tokenizer, valid, four_gram.vocab) < 126.6
