"""Parity with transformers: tiny randomly initialised HF models -> save_pretrained -> our hf.from_pretrained gives
the same logits and greedy continuations; ours -> save_pretrained -> transformers loads the same model back.

Logits are compared in float64. GPT-2 and BERT then agree to ~1e-15 and are held to 1e-12, so that a wrong detail
(an epsilon, an approximation) shows. Llama and T5 are held to 1e-5 only: transformers computes Llama's RoPE and
RMSNorm and T5's norm in float32 whatever the model dtype (``LlamaRotaryEmbedding``, ``LlamaRMSNorm``,
``T5LayerNorm``), so those comparisons carry float32 rounding; tests/nn check our float64 RoPE and RMSNorm against
the formulas at 1e-12 instead.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers as tr
from safetensors.torch import load_file, save_file

from companion.models import Bert, BertForPreTraining, CheckpointError, GPT, Llama, T5, from_pretrained, greedy_generate
from companion.models.hf import config_from_hf, config_to_hf, load_hf_state_dict, save_pretrained
from companion.nn.positional import RopeScaling

tr.logging.set_verbosity_error()
tr.logging.disable_progress_bar()
ATOL = 1e-5  # Llama, T5: transformers rounds their RoPE / norms to float32 even in a float64 model
ATOL_FLOAT64 = 1e-12  # GPT-2, BERT: float64 end to end on both sides (observed ~1e-15)
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


# Llama only at ATOL: transformers' LlamaRotaryEmbedding and LlamaRMSNorm compute in float32 (module docstring)
@pytest.mark.parametrize("factory, cls, atol", [(_gpt2, GPT, ATOL_FLOAT64), (_llama, Llama, ATOL)], ids=["gpt2", "llama"])
def test_decoder_only_parity_and_round_trip(factory, cls, atol, ids, tmp_path):
    theirs = _seed_and_build(factory)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, cls)
    theirs, ours = theirs.double(), ours.double()
    with torch.no_grad():
        ref = theirs(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=atol, rtol=0)
        # greedy continuation: HF without cache (full recompute) vs ours with a KV cache
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, theirs(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_generate(ours, ids, 8), seq)
    save_pretrained(ours, tmp_path / "ours")
    back = type(theirs).from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():  # transformers against itself, on our saved weights
        torch.testing.assert_close(back(ids).logits, ref, atol=ATOL_FLOAT64, rtol=0)


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
        torch.testing.assert_close(mlm[mask.bool()], ref.prediction_logits[mask.bool()], atol=ATOL_FLOAT64, rtol=0)
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=ATOL_FLOAT64, rtol=0)
        hidden, pooled = ours.bert(ids, types, mask)
        hf_out = theirs.bert(ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()  # padded positions' outputs are unused; compare real tokens
        torch.testing.assert_close(hidden[real], hf_out.last_hidden_state[real], atol=ATOL_FLOAT64, rtol=0)
        torch.testing.assert_close(pooled, hf_out.pooler_output, atol=ATOL_FLOAT64, rtol=0)
    assert torch.equal(mlm.argmax(-1), ref.prediction_logits.argmax(-1))  # the MLM's greedy fill-in of every slot
    save_pretrained(ours, tmp_path / "ours")
    back = tr.BertForPreTraining.from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask, token_type_ids=types).prediction_logits,
                                   ref.prediction_logits, atol=ATOL_FLOAT64, rtol=0)
    # an encoder-only checkpoint (no cls.* heads) becomes our Bert
    save_pretrained(ours.bert, tmp_path / "encoder")
    enc = from_pretrained(tmp_path / "encoder")
    assert isinstance(enc, Bert)
    enc = enc.double()
    with torch.no_grad():
        torch.testing.assert_close(enc(ids, types, mask)[0][real], hf_out.last_hidden_state[real], atol=ATOL_FLOAT64, rtol=0)


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
        # ATOL, not ATOL_FLOAT64: T5LayerNorm takes the variance in float32 (see the module docstring)
        torch.testing.assert_close(ours(ids, dec, mask), ref, atol=ATOL, rtol=0)
        seq = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id = pad = 0
        for _ in range(7):
            step = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits
            seq = torch.cat([seq, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours.generate_greedy(ids, 7, mask), seq)
    save_pretrained(ours, tmp_path / "ours")
    back = tr.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval().double()
    with torch.no_grad():  # transformers against itself, on our saved weights
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref,
                                   atol=ATOL_FLOAT64, rtol=0)


def test_float64_parity_catches_a_wrong_layer_norm_epsilon(ids, tmp_path):
    # GPT-2's eps is 1e-5; 1e-6 moves the logits by far less than the float32 tolerance 1e-5, but far more than 1e-12.
    theirs = _seed_and_build(_gpt2)
    theirs.save_pretrained(tmp_path)
    right = from_pretrained(tmp_path)
    assert right.config.norm_eps == theirs.config.layer_norm_epsilon == 1e-5
    wrong = load_hf_state_dict(GPT(replace(right.config, norm_eps=1e-6)), theirs.state_dict()).eval()
    with torch.no_grad():
        ref = theirs.double()(ids).logits
        right_diff = (right.double()(ids) - ref).abs().max().item()
        wrong_diff = (wrong.double()(ids) - ref).abs().max().item()
    assert right_diff <= ATOL_FLOAT64 < wrong_diff, (right_diff, wrong_diff)


# ----------------------------------------------------------------------------------------- Llama RoPE scaling
# head_dim 16, theta 1e4: wavelengths 2*pi*10^(i/2) = 6.3, 20, 63, ... positions. With original length 32, "llama3"
# keeps the first frequency (< 32/4), interpolates the second and divides the rest by 8, and a 64-token sequence runs
# past the original length.
ROPE_FIELDS = {"linear": {"factor": 2.0},
               "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
SCALED = {"linear": RopeScaling.linear(2.0), "llama3": RopeScaling.llama3(8.0, 1.0, 4.0, 32)}


def _llama_scaled(rope_type: str):
    return tr.LlamaForCausalLM(tr.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=80, vocab_size=V,
                                              max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                              rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0,
                                                               **ROPE_FIELDS[rope_type]}))


def _scaled_config(rope_type: str):
    return config_from_hf(_llama_scaled(rope_type).config.to_dict())


def _to_transformers_4(path, rope_type: str) -> None:
    """Rewrite config.json as transformers 4.x wrote it: top-level rope_theta, rope_scaling (linear: the pre-4.42 "type")."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 10000.0
    cfg["rope_scaling"] = {("type" if rope_type == "linear" else "rope_type"): rope_type, **ROPE_FIELDS[rope_type]}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
@pytest.mark.parametrize("writer", ["transformers5", "transformers4"])
def test_llama_rope_scaling_parity(rope_type, writer, tmp_path):
    theirs = _seed_and_build(lambda: _llama_scaled(rope_type))
    theirs.save_pretrained(tmp_path)
    if writer == "transformers4":
        _to_transformers_4(tmp_path, rope_type)
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_scaling == SCALED[rope_type] and ours.config.rope_base == 10000.0
    plain = load_hf_state_dict(Llama(replace(ours.config, rope_scaling=None)), theirs.state_dict()).eval()
    ids = torch.randint(1, V, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):  # ATOL in both: transformers' RoPE is float32 (module docstring)
            ref = theirs.to(dtype)(ids).logits
            torch.testing.assert_close(ours.to(dtype)(ids), ref, atol=ATOL, rtol=0)
        assert (plain.double()(ids) - ref).abs().max() > 1e3 * ATOL  # plain RoPE would fail this test by far
        seq = ids[:, :9]
        for _ in range(8):
            seq = torch.cat([seq, theirs(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_generate(ours, ids[:, :9], 8), seq)  # KV cache positions with scaled RoPE


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_llama_rope_scaling_round_trips_through_transformers(rope_type, tmp_path):
    torch.manual_seed(0)
    ours = Llama(replace(_scaled_config(rope_type), rope_base=5000.0)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.25)  # as _seed_and_build: big enough activations for RoPE to matter
    save_pretrained(ours, tmp_path)
    back = tr.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    expected = {"rope_type": rope_type, "rope_theta": 5000.0, **ROPE_FIELDS[rope_type]}
    assert {k: back.config.rope_parameters[k] for k in expected} == expected
    ids = torch.randint(1, V, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=ATOL, rtol=0)
    assert from_pretrained(tmp_path).config == ours.config


def test_saved_llama_config_has_rope_theta_for_older_transformers(tmp_path):
    ours = Llama(config_from_hf(_llama().config.to_dict()))
    save_pretrained(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500.0 and cfg["rope_parameters"]["rope_theta"] == 500.0  # 4.x and 5.x read these
    cfg.pop("rope_parameters")  # what a transformers 4.x reader sees of it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert tr.LlamaConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 500.0
    assert config_from_hf(cfg).rope_base == 500.0


@pytest.mark.parametrize("rope_type", ["longrope", "proportional"])  # dynamic, yarn: tests/nn/test_positional_scaling.py
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_types_are_refused(rope_type, key):
    hf = config_to_hf(Llama(config_from_hf(_llama().config.to_dict())))
    hf.pop("rope_parameters"), hf.pop("rope_scaling")
    hf[key] = {"rope_type": rope_type, "factor": 4.0, "rope_theta": 500.0}
    with pytest.raises(ValueError, match=f"rope_type='{rope_type}' \\(supported: 'default', 'linear', 'llama3', 'dynamic', 'yarn'\\)"):
        config_from_hf(hf)


def test_llama_config_rejects_a_rope_scaling_that_is_not_one():
    with pytest.raises(ValueError, match="rope_scaling must be a RopeScaling or None, got"):
        replace(config_from_hf(_llama().config.to_dict()), rope_scaling={"rope_type": "llama3", "factor": 8.0})
    hf = config_to_hf(Llama(_scaled_config("llama3")))
    del hf["rope_scaling"]["low_freq_factor"]
    with pytest.raises(ValueError, match="lacks 'low_freq_factor'"):
        config_from_hf(hf)


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
