"""companion.nn.block against nn.TransformerEncoderLayer / nn.TransformerDecoderLayer and transformers' Llama."""

import dataclasses

import pytest
import torch
from torch import nn

from companion.nn.attention import KVCache, MultiHeadAttention, causal_mask, padding_mask
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.positional import RopeScaling, rope_frequencies

TOL = dict(rtol=1e-5, atol=1e-5)


def copy_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        for lin, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_weight.chunk(3),
                             ref.in_proj_bias.chunk(3)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())


def copy_common(ours: TransformerBlock, ref: nn.Module) -> None:
    copy_mha(ours.self_attn, ref.self_attn)
    ours.ffn.up.load_state_dict(ref.linear1.state_dict())
    ours.ffn.down.load_state_dict(ref.linear2.state_dict())
    ours.norm1.load_state_dict(ref.norm1.state_dict())
    ours.norm2.load_state_dict(ref.norm2.state_dict() if isinstance(ref, nn.TransformerEncoderLayer)
                               else ref.norm3.state_dict())


def randomise_norms(ref: nn.Module) -> None:
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_encoder_style_block_matches_torch(pre_norm, causal):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                     batch_first=True, norm_first=pre_norm).eval()
    randomise_norms(ref)
    ours = TransformerBlock(BlockConfig(32, 4, d_ff=64, pre_norm=pre_norm, causal=causal)).eval()
    copy_common(ours, ref)
    x = torch.randn(2, 6, 32, requires_grad=True)  # grad on: keeps torch off its fused fast path
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    src_mask = ~causal_mask(6) if causal else None  # torch: True = blocked
    expected = ref(x, src_mask=src_mask, src_key_padding_mask=real == 0)
    torch.testing.assert_close(ours(x, mask=padding_mask(real)), expected, **TOL)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_cross_attention_block_matches_torch_decoder_layer(pre_norm):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="relu",
                                     batch_first=True, norm_first=pre_norm).eval()
    randomise_norms(ref)
    ours = TransformerBlock(BlockConfig(32, 4, d_ff=64, ffn="relu", pre_norm=pre_norm, cross_attention=True)).eval()
    copy_common(ours, ref)
    copy_mha(ours.cross_attn, ref.multihead_attn)
    ours.norm_cross.load_state_dict(ref.norm2.state_dict())
    x, memory = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 7, 32)
    real = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    expected = ref(x, memory, tgt_mask=~causal_mask(5), memory_key_padding_mask=real == 0)
    torch.testing.assert_close(ours(x, context=memory, context_mask=padding_mask(real)), expected, **TOL)


def test_llama_block_matches_transformers_decoder_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                         num_hidden_layers=1, vocab_size=16, rms_norm_eps=1e-6)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        ref.input_layernorm.weight.normal_(1.0, 0.2)
        ref.post_attention_layernorm.weight.normal_(1.0, 0.2)
    ours = TransformerBlock(BlockConfig.llama(64, 8, n_kv_heads=2, d_ff=96)).eval()
    a, m = ref.self_attn, ref.mlp
    ours.load_state_dict({
        "norm1.weight": ref.input_layernorm.weight, "norm2.weight": ref.post_attention_layernorm.weight,
        "self_attn.q_proj.weight": a.q_proj.weight, "self_attn.k_proj.weight": a.k_proj.weight,
        "self_attn.v_proj.weight": a.v_proj.weight, "self_attn.out_proj.weight": a.o_proj.weight,
        "ffn.gate.weight": m.gate_proj.weight, "ffn.up.weight": m.up_proj.weight, "ffn.down.weight": m.down_proj.weight,
    })
    x = torch.randn(2, 9, 64)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(9)[None].expand(2, 9))
    additive = torch.zeros(9, 9).masked_fill(~causal_mask(9), float("-inf"))[None, None]
    expected = ref(x, attention_mask=additive, position_embeddings=cos_sin)
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_block_kv_cache_equals_full_pass():
    torch.manual_seed(0)
    block = TransformerBlock(BlockConfig.llama(32, 4, n_kv_heads=2)).eval()
    x = torch.randn(1, 6, 32)
    cache = KVCache()
    steps = [block(x[:, :3], kv_cache=cache)] + [block(x[:, i : i + 1], kv_cache=cache) for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), block(x), **TOL)


def test_presets_and_config_errors():
    assert BlockConfig.llama(768, 12).ffn_hidden == 2048  # 2/3 * 4 * 768 = 2048, already a multiple of 64
    assert BlockConfig.gpt2().ffn_hidden == 3072 and not BlockConfig.bert().pre_norm
    cfg = BlockConfig(16, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 32
    with pytest.raises(ValueError, match="d_model=30 and n_heads=4"):
        BlockConfig(30, 4)
    with pytest.raises(ValueError, match="n_heads=4 and n_kv_heads=3"):
        dataclasses.replace(cfg, d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms', got 'batch'"):
        BlockConfig(16, 2, norm="batch")
    with pytest.raises(ValueError, match="cross_attention=False"):
        TransformerBlock(cfg)(torch.randn(1, 2, 16), context=torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="pass the encoder output"):
        TransformerBlock(dataclasses.replace(cfg, cross_attention=True))(torch.randn(1, 2, 16))


def test_rope_scaling_reaches_self_attention_only():
    scaling = RopeScaling.llama3(8.0, 1.0, 4.0, 16)
    cfg = BlockConfig.llama(32, 4, rope_scaling=scaling, cross_attention=True)
    assert cfg.attention().rope_scaling == scaling and cfg.attention(cross=True).rope_scaling is None
    block = TransformerBlock(cfg)
    assert torch.equal(block.self_attn.rope.inv_freq, rope_frequencies(8, 10000.0, scaling))
    assert not torch.equal(block.self_attn.rope.inv_freq, rope_frequencies(8, 10000.0))
    assert block.cross_attn.rope is None
    with pytest.raises(ValueError, match="rope_scaling needs positional='rope', got positional='none'"):
        BlockConfig(16, 2, rope_scaling=scaling)


def test_dropout_only_in_training():
    block = TransformerBlock(BlockConfig(16, 2, dropout=0.5))
    x = torch.randn(2, 4, 16)
    block.eval()
    torch.testing.assert_close(block(x), block(x))
    block.train()
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, block(x))
