"""Inference (chapter 10): decoding strategies, the KV cache, speculative decoding, and model compression."""

from companion.inference.beam_search import beam_search
from companion.inference.decoding import GenerationConfig, GenerationOutput, generate, stream
from companion.inference.processors import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from companion.inference.kv_cache import PreallocatedKVCache, allocate_kv_caches
from companion.inference.optimize import optimize_for_decoding, restore_modules
from companion.inference.speculative import SpeculativeOutput, speculative_generate
