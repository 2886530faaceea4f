"""Hugging Face interop: load a `transformers` checkpoint (config.json + safetensors) into our models, save ours back.

Supports GPT-2 (`GPT2LMHeadModel`), Llama (`LlamaForCausalLM`), BERT (`BertModel`, `BertForPreTraining`) and T5 v1.0
(`T5ForConditionalGeneration`). Each family is a list of rules mapping our parameter names to theirs, with the
transform in each direction (GPT-2 stores linear layers as (in, out) `Conv1D` weights and fuses q, k, v into one
`c_attn`). Only the local filesystem is read: nothing is downloaded. Tied copies (`lm_head.weight`, T5's per-stack
`embed_tokens`) are not written, as `save_pretrained` does; when present in a checkpoint they must equal the tensor
they are tied to. A checkpoint whose keys do not fit raises `CheckpointError` listing every missing, unexpected and
mis-shaped key. Llama's RoPE scaling ("linear", "llama3", "dynamic", "yarn") is read and written; other rope types
are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from companion.errors import CheckpointError
from companion.models.bert import Bert, BertConfig, BertForPreTraining
from companion.models.gpt import GPT, GPTConfig
from companion.models.llama import Llama, LlamaConfig
from companion.models.t5 import T5, T5Config
from companion.nn.positional import RopeScaling

HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"  # file names of a transformers checkpoint directory

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """Our parameters ``ours`` hold the checkpoint tensors ``theirs``, converted by ``load`` and back by ``save``."""

    ours: tuple[str, ...]  # our parameter names
    theirs: tuple[str, ...]  # the checkpoint's tensor names
    load: Callable[[Tensors], Tensors] = lambda ts: ts  # theirs -> ours
    save: Callable[[Tensors], Tensors] = lambda ts: ts  # ours -> theirs


def _same(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def _linear(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    return [_same(f"{ours}.weight", f"{theirs}.weight")] + ([_same(f"{ours}.bias", f"{theirs}.bias")] if bias else [])


def _conv1d(ours: str, theirs: str) -> list[Rule]:
    """GPT-2's Conv1D keeps the weight as (in, out): transpose both ways."""
    t = lambda ts: [ts[0].T.contiguous()]  # noqa: E731
    return [Rule((f"{ours}.weight",), (f"{theirs}.weight",), t, t), _same(f"{ours}.bias", f"{theirs}.bias")]


def _fused_qkv(ours: str, theirs: str) -> list[Rule]:
    """GPT-2's c_attn: weight (C, 3C) = [Wq | Wk | Wv] in Conv1D layout, bias (3C,)."""
    names = [f"{ours}.{p}_proj" for p in "qkv"]
    return [
        Rule(tuple(f"{n}.weight" for n in names), (f"{theirs}.weight",),
             lambda ts: [w.T.contiguous() for w in ts[0].chunk(3, dim=1)], lambda ts: [torch.cat(ts, dim=0).T.contiguous()]),
        Rule(tuple(f"{n}.bias" for n in names), (f"{theirs}.bias",),
             lambda ts: list(ts[0].chunk(3)), lambda ts: [torch.cat(ts)]),
    ]


def _norm(ours: str, theirs: str, bias: bool = True) -> list[Rule]:
    return _linear(ours, theirs, bias)


# --------------------------------------------------------------------------------------------- per-family tables
def _gpt2_rules(cfg: GPTConfig) -> list[Rule]:
    p = "transformer."
    rules = [_same("tok_emb.weight", p + "wte.weight"), _same("pos_emb.weight", p + "wpe.weight")]
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}.", f"{p}h.{i}."
        rules += _norm(o + "norm1", t + "ln_1") + _fused_qkv(o + "self_attn", t + "attn.c_attn")
        rules += _conv1d(o + "self_attn.out_proj", t + "attn.c_proj") + _norm(o + "norm2", t + "ln_2")
        rules += _conv1d(o + "ffn.up", t + "mlp.c_fc") + _conv1d(o + "ffn.down", t + "mlp.c_proj")
    rules += _norm("norm", p + "ln_f")
    if not cfg.tie_embeddings:
        rules.append(_same("lm_head.weight", "lm_head.weight"))
    return rules


def _llama_rules(cfg: LlamaConfig) -> list[Rule]:
    rules = [_same("tok_emb.weight", "model.embed_tokens.weight")]
    for i in range(cfg.n_layers):
        o, t = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            rules += _linear(f"{o}self_attn.{ours}", f"{t}self_attn.{theirs}", bias=False)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            rules += _linear(f"{o}ffn.{ours}", f"{t}mlp.{theirs}", bias=False)
        rules += [_same(o + "norm1.weight", t + "input_layernorm.weight"),
                  _same(o + "norm2.weight", t + "post_attention_layernorm.weight")]
    rules.append(_same("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(_same("lm_head.weight", "lm_head.weight"))
    return rules


def _bert_rules(cfg: BertConfig, heads: bool) -> list[Rule]:
    o0, t0 = ("bert.", "bert.") if heads else ("", "")
    e = t0 + "embeddings."
    rules = [_same(o0 + "tok_emb.weight", e + "word_embeddings.weight"),
             _same(o0 + "pos_emb.weight", e + "position_embeddings.weight"),
             _same(o0 + "type_emb.weight", e + "token_type_embeddings.weight")] + _norm(o0 + "emb_norm", e + "LayerNorm")
    for i in range(cfg.n_layers):
        o, t = f"{o0}blocks.{i}.", f"{t0}encoder.layer.{i}."
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules += _linear(f"{o}self_attn.{ours}", f"{t}attention.self.{theirs}")
        rules += _linear(o + "self_attn.out_proj", t + "attention.output.dense") + _norm(o + "norm1", t + "attention.output.LayerNorm")
        rules += _linear(o + "ffn.up", t + "intermediate.dense") + _linear(o + "ffn.down", t + "output.dense")
        rules += _norm(o + "norm2", t + "output.LayerNorm")
    rules += _linear(o0 + "pooler", t0 + "pooler.dense")
    if heads:
        rules += _linear("mlm_dense", "cls.predictions.transform.dense") + _norm("mlm_norm", "cls.predictions.transform.LayerNorm")
        rules += [_same("mlm_bias", "cls.predictions.bias")] + _linear("nsp", "cls.seq_relationship")
    return rules


def _t5_rules(cfg: T5Config) -> list[Rule]:
    rules = [_same("shared.weight", "shared.weight")]
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            o, t = f"{stack}.{i}.", f"{stack}.block.{i}.layer."
            sub = [("self_attn", "0.SelfAttention", "norm1", "0")]
            sub += [("cross_attn", "1.EncDecAttention", "norm_cross", "1")] if stack == "decoder" else []
            for attn, theirs, norm, j in sub:
                for ours_p, theirs_p in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
                    rules += _linear(f"{o}{attn}.{ours_p}", f"{t}{theirs}.{theirs_p}", bias=False)
                rules.append(_same(f"{o}{norm}.weight", f"{t}{j}.layer_norm.weight"))
            f = "2" if stack == "decoder" else "1"
            rules += _linear(o + "ffn.up", f"{t}{f}.DenseReluDense.wi", bias=False)
            rules += _linear(o + "ffn.down", f"{t}{f}.DenseReluDense.wo", bias=False)
            rules.append(_same(o + "norm2.weight", f"{t}{f}.layer_norm.weight"))
        rules.append(_same(f"{stack}_bias.embedding.weight", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        rules.append(_same(f"{stack}_norm.weight", f"{stack}.final_layer_norm.weight"))
    return rules


def weight_mapping_rules(model: nn.Module) -> tuple[list[Rule], dict[str, str], list[str]]:
    """How ``model``'s parameters correspond to the tensors of a transformers checkpoint; returns three values:

    - ``rules``: one `Rule` per group of tensors: our parameter names (``rule.ours``), the checkpoint's names
      (``rule.theirs``) and the transforms between them (``rule.load``, ``rule.save``; e.g. GPT-2's transposes);
    - ``tied``: {checkpoint key: our parameter name} for tied copies (``lm_head.weight`` -> ``tok_emb.weight``):
      `save_pretrained` does not write them; when a checkpoint holds one it must equal the tensor it is tied to;
    - ``ignored``: regular expressions (``re.fullmatch``) for checkpoint keys that are buffers, not weights (GPT-2's
      ``attn.bias``, Llama's ``rotary_emb.inv_freq``, BERT's ``position_ids``), skipped when loading.

    Raises ``TypeError`` for a model with no Hugging Face mapping.
    """
    cfg = model.config
    if isinstance(model, GPT) and getattr(cfg, "moe", None) is not None:
        raise TypeError(f"no Hugging Face mapping for a GPT with a mixture-of-experts MLP (moe={cfg.moe})")
    if isinstance(model, GPT):
        tied = {"lm_head.weight": "tok_emb.weight"} if cfg.tie_embeddings else {}
        return _gpt2_rules(cfg), tied, [r"transformer\.h\.\d+\.attn\.(masked_)?bias"]
    if isinstance(model, Llama):
        tied = {"lm_head.weight": "tok_emb.weight"} if cfg.tie_embeddings else {}
        return _llama_rules(cfg), tied, [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if isinstance(model, (Bert, BertForPreTraining)):
        heads = isinstance(model, BertForPreTraining)
        tied = {"cls.predictions.decoder.weight": "bert.tok_emb.weight", "cls.predictions.decoder.bias": "mlm_bias"} if heads else {}
        return _bert_rules(cfg, heads), tied, [r"(bert\.)?embeddings\.position_ids"]
    if isinstance(model, T5):
        tied = {k: "shared.weight" for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
        return _t5_rules(cfg), tied, []
    raise TypeError(f"no Hugging Face mapping for {type(model).__name__}")


# --------------------------------------------------------------------------------------------- state dicts
def load_hf_state_dict(model: nn.Module, theirs: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a transformers state dict into ``model`` (in place); raise `CheckpointError` if the keys do not fit."""
    rules, tied, ignore = weight_mapping_rules(model)
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    converted: dict[str, torch.Tensor] = {}
    missing, shapes, used = [], [], set()
    for rule in rules:
        absent = [k for k in rule.theirs if k not in theirs]
        if absent:
            missing += absent
            continue
        used.update(rule.theirs)
        for name, tensor in zip(rule.ours, rule.load([theirs[k] for k in rule.theirs])):
            if tuple(tensor.shape) != tuple(params[name].shape):
                shapes.append(f"{name} <- {rule.theirs[0]}: checkpoint {tuple(tensor.shape)} vs model {tuple(params[name].shape)}")
            converted[name] = tensor
    used.update(k for k in tied if k in theirs)
    unexpected = sorted(k for k in theirs if k not in used and not any(re.fullmatch(p, k) for p in ignore))
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}, "
                              f"mis-shaped {shapes}")
    for their_key, our_key in tied.items():
        if their_key in theirs and not torch.equal(theirs[their_key], converted[our_key]):
            raise CheckpointError(f"{their_key} differs from {our_key}, but the model ties them")
    with torch.no_grad():
        for name, tensor in converted.items():
            params[name].copy_(tensor)
    return model


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' names (tied copies left out, as `save_pretrained` does)."""
    rules, _, _ = weight_mapping_rules(model)
    ours = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        for name, tensor in zip(rule.theirs, rule.save([ours[k].detach() for k in rule.ours])):
            out[name] = tensor.contiguous().clone()
    return out


# --------------------------------------------------------------------------------------------- configs
def _require(hf: dict, key: str, allowed: tuple, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ValueError(f"unsupported {hf.get('model_type')} config: {key}={value!r} (supported: {allowed})")


def _llama_rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from a Llama config.json as transformers reads it: transformers 5 writes ``rope_parameters``
    (rope_type, rope_theta, scaling fields), 4.x wrote ``rope_scaling`` (``type`` before 4.42) beside a top-level
    ``rope_theta``; like transformers, ``rope_scaling`` wins when both are there. Only "default", "linear", "llama3",
    "dynamic" and "yarn" are implemented: any other rope_type (longrope, ...) raises instead of loading as plain
    RoPE and giving wrong logits."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "dynamic", "yarn"):
        raise ValueError(f"unsupported llama config: rope_type={rope_type!r} "
                         f"(supported: 'default', 'linear', 'llama3', 'dynamic', 'yarn')")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0, None):
        raise ValueError(f"unsupported llama config: partial_rotary_factor={partial!r} (only 1.0: RoPE on the whole head)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    def field(key: str) -> float:
        if key not in rope:
            raise ValueError(f"llama config with rope_type={rope_type!r} lacks {key!r} in its RoPE parameters {rope}")
        return rope[key]

    if rope_type == "linear":
        return theta, RopeScaling.linear(field("factor"))
    if rope_type == "dynamic":  # transformers' dynamic NTK stretches beyond max_position_embeddings
        return theta, RopeScaling.dynamic(field("factor"), hf.get("max_position_embeddings", 2048))
    # pretraining length: a top-level field first, as transformers' standardize_rope_params
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings", 2048)
    if rope_type == "llama3":
        return theta, RopeScaling.llama3(field("factor"), field("low_freq_factor"), field("high_freq_factor"), original)
    if rope_type == "yarn":  # attention factor as _compute_yarn_parameters infers it (DeepSeek's mscale ratio)
        factor, attention, mscale, mscale_all = field("factor"), rope.get("attention_factor"), rope.get("mscale"), \
            rope.get("mscale_all_dim")
        if attention is None and mscale and mscale_all:
            attention = (0.1 * mscale * math.log(factor) + 1.0) / (0.1 * mscale_all * math.log(factor) + 1.0) \
                if factor > 1 else 1.0
        return theta, RopeScaling.yarn(factor, original, rope.get("beta_fast") or 32.0, rope.get("beta_slow") or 1.0,
                                       attention, rope.get("truncate", True))
    return theta, None


def _llama_rope_to_hf(c: LlamaConfig) -> dict:
    """RoPE fields for config.json, readable by transformers 5 (``rope_parameters``) and 4.x (``rope_theta``,
    ``rope_scaling``)."""
    s = c.rope_scaling
    if s is None:
        scaling = None
    elif s.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    elif s.rope_type == "dynamic":
        scaling = {"rope_type": "dynamic", "factor": s.factor}
    elif s.rope_type == "yarn":
        scaling = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_position_embeddings,
                   "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate,
                   **({} if s.attention_factor is None else {"attention_factor": s.attention_factor})}
    else:
        raise ValueError(f"rope_type={s.rope_type!r} has no transformers equivalent (use 'dynamic' or 'yarn')")
    parameters = {"rope_theta": c.rope_base, **(scaling or {"rope_type": "default"})}
    extra = {"max_position_embeddings": s.original_max_position_embeddings} if s and s.rope_type == "dynamic" else {}
    return {"rope_theta": c.rope_base, "rope_scaling": scaling, "rope_parameters": parameters, **extra}


def config_from_hf(hf: dict) -> GPTConfig | LlamaConfig | BertConfig | T5Config:
    """Our config from a transformers config.json dict; raises on features our models do not implement."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh", "gelu"), "gelu_new")
        _require(hf, "scale_attn_weights", (True,), True)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        return GPTConfig(vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"], n_layers=hf["n_layer"], d_model=hf["n_embd"],
                         n_heads=hf["n_head"], d_ff=hf.get("n_inner"), ffn="gelu" if act == "gelu" else "gelu_tanh",
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "llama":
        _require(hf, "hidden_act", ("silu",), "silu")
        _require(hf, "attention_bias", (False,), False)
        _require(hf, "mlp_bias", (False,), False)
        rope_base, rope_scaling = _llama_rope_from_hf(hf)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise ValueError(f"head_dim * num_attention_heads must equal hidden_size, got {head_dim} * "
                             f"{hf['num_attention_heads']} != {hf['hidden_size']}")
        n_ctx = hf.get("max_position_embeddings", 2048)  # dynamic NTK: the length its factor stretches to
        n_ctx = int(n_ctx * rope_scaling.factor) if rope_scaling and rope_scaling.rope_type == "dynamic" else n_ctx
        return LlamaConfig(vocab_size=hf["vocab_size"], n_ctx=n_ctx,
                           n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                           n_kv_heads=hf.get("num_key_value_heads"), d_ff=hf["intermediate_size"],
                           norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=rope_base, rope_scaling=rope_scaling,
                           tie_embeddings=hf.get("tie_word_embeddings", False))
    if kind == "bert":
        _require(hf, "hidden_act", ("gelu",), "gelu")
        _require(hf, "position_embedding_type", ("absolute",), "absolute")
        return BertConfig(vocab_size=hf["vocab_size"], n_ctx=hf.get("max_position_embeddings", 512),
                          n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                          d_ff=hf["intermediate_size"], type_vocab_size=hf.get("type_vocab_size", 2),
                          norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=hf.get("hidden_dropout_prob", 0.1))
    if kind == "t5":
        _require(hf, "feed_forward_proj", ("relu",), "relu")
        _require(hf, "tie_word_embeddings", (True,), True)
        if hf.get("d_kv", 64) * hf["num_heads"] != hf["d_model"]:
            raise ValueError(f"T5 needs d_kv * num_heads == d_model, got {hf.get('d_kv')} * {hf['num_heads']} != {hf['d_model']}")
        return T5Config(vocab_size=hf["vocab_size"], n_layers=hf["num_layers"], n_decoder_layers=hf.get("num_decoder_layers"),
                        d_model=hf["d_model"], n_heads=hf["num_heads"], d_ff=hf["d_ff"],
                        num_buckets=hf.get("relative_attention_num_buckets", 32),
                        max_distance=hf.get("relative_attention_max_distance", 128), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                        dropout=hf.get("dropout_rate", 0.1), decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
                        eos_token_id=hf.get("eos_token_id", 1))
    raise ValueError(f"model_type must be one of 'gpt2', 'llama', 'bert', 't5', got {kind!r}")


def config_to_hf(model: nn.Module) -> dict:
    """A transformers config.json dict describing ``model``."""
    c = model.config
    if isinstance(model, GPT):
        if getattr(c, "moe", None) is not None:
            raise TypeError(f"no Hugging Face mapping for a GPT with a mixture-of-experts MLP (moe={c.moe})")
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size, "n_positions": c.n_ctx,
                "n_layer": c.n_layers, "n_embd": c.d_model, "n_head": c.n_heads, "n_inner": c.d_ff,
                "activation_function": "gelu" if c.ffn == "gelu" else "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "tie_word_embeddings": c.tie_embeddings}
    if isinstance(model, Llama):
        if c.qk_norm or c.sliding_window is not None:
            raise ValueError(f"LlamaForCausalLM has no QK-norm or sliding window, got qk_norm={c.qk_norm}, "
                             f"sliding_window={c.sliding_window}")
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
                "max_position_embeddings": c.n_ctx, "num_hidden_layers": c.n_layers, "hidden_size": c.d_model,
                "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads or c.n_heads,
                "intermediate_size": c.d_ff, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
                **_llama_rope_to_hf(c), "tie_word_embeddings": c.tie_embeddings}
    if isinstance(model, (Bert, BertForPreTraining)):
        arch = "BertForPreTraining" if isinstance(model, BertForPreTraining) else "BertModel"
        return {"model_type": "bert", "architectures": [arch], "vocab_size": c.vocab_size, "max_position_embeddings": c.n_ctx,
                "num_hidden_layers": c.n_layers, "hidden_size": c.d_model, "num_attention_heads": c.n_heads,
                "intermediate_size": c.d_ff, "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps,
                "hidden_act": "gelu", "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout}
    if isinstance(model, T5):
        return {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": c.vocab_size,
                "num_layers": c.n_layers, "num_decoder_layers": c.decoder_layers, "d_model": c.d_model, "num_heads": c.n_heads,
                "d_kv": c.d_model // c.n_heads, "d_ff": c.d_ff, "relative_attention_num_buckets": c.num_buckets,
                "relative_attention_max_distance": c.max_distance, "layer_norm_epsilon": c.norm_eps, "dropout_rate": c.dropout,
                "feed_forward_proj": "relu", "tie_word_embeddings": True, "decoder_start_token_id": c.decoder_start_token_id,
                "pad_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id}
    raise TypeError(f"no Hugging Face mapping for {type(model).__name__}")


# --------------------------------------------------------------------------------------------- directories
def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, or the shards named in model.safetensors.index.json."""
    path = Path(path)
    index = path / f"{HF_WEIGHTS}.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if not (path / HF_WEIGHTS).exists():
        raise FileNotFoundError(f"no {HF_WEIGHTS} or {HF_WEIGHTS}.index.json in {str(path)!r}")
    return load_file(path / HF_WEIGHTS)


def from_pretrained(path: str | Path) -> nn.Module:
    """Build our model from a local transformers checkpoint directory and load its weights (eval mode).

    BERT checkpoints with `cls.*` heads become `BertForPreTraining`, others (e.g. sentence encoders) `Bert`.
    """
    path = Path(path)
    hf = json.loads((path / HF_CONFIG).read_text())
    config = config_from_hf(hf)
    theirs = read_safetensors(path)
    if isinstance(config, GPTConfig):
        model: nn.Module = GPT(config)
    elif isinstance(config, LlamaConfig):
        model = Llama(config)
    elif isinstance(config, BertConfig):
        model = BertForPreTraining(config) if any(k.startswith("cls.") for k in theirs) else Bert(config)
    else:
        model = T5(config)
    return load_hf_state_dict(model, theirs).eval()


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write config.json and model.safetensors that `transformers.AutoModel*.from_pretrained(path)` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / HF_CONFIG).write_text(json.dumps(config_to_hf(model), indent=2))
    save_file(to_hf_state_dict(model), path / HF_WEIGHTS, metadata={"format": "pt"})
    return path
