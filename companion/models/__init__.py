"""Chapter 5 model architectures, all stacked from `companion.nn.TransformerBlock`.

Decoder-only: `GPT` (GPT-2) and `Llama` (RMSNorm, SwiGLU, RoPE, grouped-query attention); encoder-only: `Bert`,
`BertForPreTraining`; encoder-decoder: `T5`. `counting` gives parameter counts from a config (`flops_per_token`
of a config is `companion.scaling`'s, re-exported); `hf` loads and saves Hugging Face `transformers` checkpoints; `gguf` loads llama.cpp's GGUF files
(SmolLM2-135M-Instruct offline: `load_smollm2`).
"""

from companion.models.base import check_length, greedy_generate
from companion.models.bert import Bert, BertConfig, BertForPreTraining, mean_pool
from companion.models.counting import count_parameters, parameter_breakdown
from companion.models.gguf import load_gguf_llama, load_smollm2, smollm2_available
from companion.models.gpt import GPT, GPTConfig
from companion.models.hf import (
    CheckpointError,
    from_pretrained,
    load_hf_state_dict,
    save_pretrained,
    to_hf_state_dict,
    weight_mapping_rules,
)
from companion.models.llama import Llama, LlamaConfig
from companion.models.t5 import T5, RelativePositionBias, T5Config, relative_position_bucket
from companion.scaling import flops_per_token

__all__ = [
    "Bert",
    "BertConfig",
    "BertForPreTraining",
    "CheckpointError",
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "RelativePositionBias",
    "T5",
    "T5Config",
    "check_length",
    "count_parameters",
    "flops_per_token",
    "from_pretrained",
    "greedy_generate",
    "load_gguf_llama",
    "load_hf_state_dict",
    "load_smollm2",
    "mean_pool",
    "parameter_breakdown",
    "relative_position_bucket",
    "save_pretrained",
    "smollm2_available",
    "to_hf_state_dict",
    "weight_mapping_rules",
]
