"""Parity with transformers: tiny randomly initialised HF models -> save_pretrained -> our hf.from_pretrained gives
the same logits (1e-5) and greedy continuations; ours -> save_pretrained -> transformers loads the same model back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tr
from safetensors.torch import load_file, save_file

from companion.models import Bert, BertForPreTraining, CheckpointError, GPT, Llama, T5, from_pretrained, greedy_generate
from companion.models.hf import save_pretrained

tr.logging.set_verbosity_error()
tr.logging.disable_progress_bar()
ATOL = 1e-5
V = 97


def _gpt2():
    return tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=24,
                                            bos_token_id=0, eos_token_id=0))


def _llama():
    return tr.LlamaForCausalLM(tr.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=80, vocab_size=V,
                                              max_position_embeddings=24, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                              bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _bert():
    return tr.BertForPreTraining(tr.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                               intermediate_size=64, vocab_size=V, max_position_embeddings=24))


def _t5():
    return tr.T5ForConditionalGeneration(tr.T5Config(num_layers=2, num_decoder_layers=3, d_model=32, num_heads=4, d_kv=8,
                                                     d_ff=64, vocab_size=V, relative_attention_num_buckets=8,
                                                     relative_attention_max_distance=16))


def _seed_and_build(factory):
    """Build with seed 0, then draw every weight from N(0, 0.25^2): the default init (std 0.02) keeps activations so
    small that e.g. exact and tanh GELU, or a missing norm weight, would agree within the tolerance."""
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.25)
    return model


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory, cls", [(_gpt2, GPT), (_llama, Llama)], ids=["gpt2", "llama"])
def test_decoder_only_parity_and_round_trip(factory, cls, ids, tmp_path):
    theirs = _seed_and_build(factory)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, cls)
    theirs, ours = theirs.double(), ours.double()
    with torch.no_grad():
        ref = theirs(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=ATOL, rtol=0)
        # greedy continuation: HF without cache (full recompute) vs ours with a KV cache
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, theirs(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_generate(ours, ids, 8), seq)
    save_pretrained(ours, tmp_path / "ours")
    back = type(theirs).from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=ATOL, rtol=0)


def test_bert_parity_and_round_trip(ids, tmp_path):
    theirs = _seed_and_build(_bert)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, BertForPreTraining)
    theirs, ours = theirs.double(), ours.double()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second sequence
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    with torch.no_grad():
        ref = theirs(ids, attention_mask=mask, token_type_ids=types)
        mlm, nsp = ours(ids, types, mask)
        torch.testing.assert_close(mlm[mask.bool()], ref.prediction_logits[mask.bool()], atol=ATOL, rtol=0)
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=ATOL, rtol=0)
        hidden, pooled = ours.bert(ids, types, mask)
        hf_out = theirs.bert(ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()  # padded positions' outputs are unused; compare real tokens
        torch.testing.assert_close(hidden[real], hf_out.last_hidden_state[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(pooled, hf_out.pooler_output, atol=ATOL, rtol=0)
    assert torch.equal(mlm.argmax(-1), ref.prediction_logits.argmax(-1))  # the MLM's greedy fill-in of every slot
    save_pretrained(ours, tmp_path / "ours")
    back = tr.BertForPreTraining.from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask, token_type_ids=types).prediction_logits,
                                   ref.prediction_logits, atol=ATOL, rtol=0)
    # an encoder-only checkpoint (no cls.* heads) becomes our Bert
    save_pretrained(ours.bert, tmp_path / "encoder")
    enc = from_pretrained(tmp_path / "encoder")
    assert isinstance(enc, Bert)
    enc = enc.double()
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, types, mask)[0][real], hf_out.last_hidden_state[real], atol=ATOL, rtol=0)


def test_t5_parity_and_round_trip(ids, tmp_path):
    theirs = _seed_and_build(_t5)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, T5)
    theirs, ours = theirs.double(), ours.double()
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    dec = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(ours(ids, dec, mask), ref, atol=ATOL, rtol=0)
        seq = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id = pad = 0
        for _ in range(7):
            step = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits
            seq = torch.cat([seq, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate_greedy(ids, 7, mask), seq)
    save_pretrained(ours, tmp_path / "ours")
    back = tr.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref,
                                   atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture()
def gpt2_dir(tmp_path):
    _seed_and_build(_gpt2).save_pretrained(tmp_path)
    return tmp_path


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_key_is_named(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['transformer\.h\.1\.ln_2\.bias'\]"):
        from_pretrained(gpt2_dir)


def test_unexpected_key_is_named(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.__setitem__("transformer.h.9.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected \['transformer\.h\.9\.extra\.weight'\]"):
        from_pretrained(gpt2_dir)


def test_misshaped_key_is_named_with_both_shapes(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.__setitem__("transformer.wpe.weight", torch.zeros(23, 32)))
    with pytest.raises(CheckpointError, match=r"pos_emb\.weight <- transformer\.wpe\.weight: checkpoint \(23, 32\) vs model \(24, 32\)"):
        from_pretrained(gpt2_dir)


def test_untied_head_into_tied_model_is_refused(gpt2_dir):
    _edit(gpt2_dir, lambda t: t.__setitem__("lm_head.weight", torch.zeros(V, 32)))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from tok_emb.weight"):
        from_pretrained(gpt2_dir)


def test_unsupported_config_is_named(gpt2_dir):
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (gpt2_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        from_pretrained(gpt2_dir)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="got 'mamba'"):
        from_pretrained(tmp_path)
