"""Companion package of 《大规模语言模型：从理论到实践》: everything the book runs, importable on its own.

Shape notation used throughout the package (torchtune style):
    B batch, T time/sequence, S source length, H heads, G key/value groups, D head dim,
    C model width, V vocabulary.

The flat public API below is loaded lazily (PEP 562): ``import companion`` stays fast, and
``companion.BPETokenizer`` imports ``companion.tokenization`` on first use.
"""

from __future__ import annotations

import importlib

from companion._meta import REPOSITORY_URL, __version__
from companion.data import DataChecksumError, DataError, data_path, load_manifest
from companion.runtime import (
    Precision,
    choose_device,
    choose_precision,
    cpu_has_native_bf16,
    cuda_has_native_bf16,
    environment_report,
    seed_everything,
    set_deterministic,
    set_threads,
    setup_notebook,
    show_source,
)

# name -> module that defines it
_LAZY = {
    # data: corpora as datasets.Dataset
    **dict.fromkeys(["load_tang_poems", "tang_poem_splits", "split_dataset", "load_reviews", "load_shakespeare"],
                    "companion.data"),
    # tokenization
    **dict.fromkeys(["CharTokenizer", "BPETokenizer", "load_gpt2_tokenizer", "gpt2_tiktoken_encoding",
                     "load_tokenizer"], "companion.tokenization"),
    **dict.fromkeys(["WordPieceTokenizer", "UnigramTokenizer"], "companion.tokenization"),
    # corpus hygiene: cleaning, MinHash-LSH near duplicates, quality rules, contamination
    **dict.fromkeys(["MinHashConfig", "MinHasher", "near_duplicate_pairs", "QualityConfig", "quality_failures",
                     "contamination"], "companion.dedup"),
    # pipeline
    **dict.fromkeys(["PackConfig", "tokenize_and_pack", "CausalLMCollator", "MaskedLMCollator", "PairCollator",
                     "make_dataloader"], "companion.pipeline"),
    # attention and Transformer blocks
    **dict.fromkeys(["MultiHeadAttention", "AttentionConfig", "TransformerBlock", "BlockConfig",
                     "scaled_dot_product_attention", "KVCache", "LayerNorm", "RMSNorm", "FeedForward",
                     "RotaryEmbedding", "RopeScaling", "causal_mask", "padding_mask", "tiled_attention",
                     "online_logsumexp", "MoE", "MoEConfig", "MLAConfig", "MultiHeadLatentAttention",
                     "kv_cache_bytes_per_token", "sliding_window_mask"], "companion.nn"),
    # model families, counting, Hugging Face interop
    **dict.fromkeys(["GPT", "GPTConfig", "Llama", "LlamaConfig", "Bert", "BertConfig", "BertForPreTraining", "T5",
                     "T5Config", "count_parameters", "greedy_generate", "mean_pool", "load_smollm2",
                     "load_gguf_llama", "smollm2_available"], "companion.models"),
    # scaling arithmetic and count-based / neural language-model basics
    **dict.fromkeys(["flops_per_token", "training_flops", "chinchilla_optimal", "ChinchillaLaw",
                     "weight_memory_bytes"], "companion.scaling"),
    **dict.fromkeys(["NGramLM", "NGramConfig", "MLPLanguageModel", "MLPLMConfig", "context_windows",
                     "perplexity_from_nll"], "companion.lm_basics"),
    # pretraining objectives and the trainer
    **dict.fromkeys(["causal_lm_loss", "linear_cross_entropy", "fused_causal_lm_loss", "mask_tokens", "nsp_pairs",
                     "bert_pretraining_loss", "MaskingConfig"], "companion.objectives"),
    **dict.fromkeys(["Trainer", "TrainConfig", "OptimizerConfig", "lr_at", "build_optimizer", "save_checkpoint",
                     "load_checkpoint", "History", "plot_history", "MemoryEstimate", "estimate_memory",
                     "memory_table", "format_gib"], "companion.training"),
    # fine-tuning: LoRA and sequence classification
    **dict.fromkeys(["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "unload_lora",
                     "save_lora", "load_lora", "SequenceClassifier", "ClassifierConfig", "ClassificationCollator",
                     "classification_loss", "classification_eval_fn", "save_classifier", "load_classifier"],
                    "companion.finetuning"),
    # fine-tuning: instruction tuning, DPO, GRPO and their poetry tasks
    **dict.fromkeys(["ChatTemplate", "SFTConfig", "SupervisionError", "add_special_tokens", "check_supervision",
                     "poetry_sft", "DPOConfig", "dpo_loss", "train_dpo", "GRPOConfig", "grpo_loss",
                     "group_advantages", "train_grpo", "form_tasks", "preference_pairs", "follows_form"],
                    "companion.finetuning"),
    # evaluation: perplexity, classification and text metrics, multiple choice, calibration, bootstrap
    **dict.fromkeys(["evaluate_perplexity", "PerplexityResult", "precision_recall_f1", "f1_score",
                     "confusion_matrix", "bootstrap_ci", "corpus_bleu", "corpus_chrf", "rouge", "MultipleChoice",
                     "score_multiple_choice", "next_line_questions", "arithmetic_questions",
                     "expected_calibration_error", "reliability_diagram", "fit_temperature"],
                    "companion.evaluation"),
    # inference: decoding strategies, KV cache, speculative decoding
    **dict.fromkeys(["GenerationConfig", "GenerationOutput", "generate", "stream", "PreallocatedKVCache",
                     "allocate_kv_caches", "speculative_generate", "SpeculativeOutput"], "companion.inference"),
    "load_pretrained": "companion.training.recipes",
    "CheckpointError": "companion.errors",
    "load_hf_model": "companion.models",  # alias of companion.models.from_pretrained
    "save_hf_model": "companion.models",  # alias of companion.models.save_pretrained
}

_ALIASES = {"load_hf_model": "from_pretrained", "save_hf_model": "save_pretrained"}

__all__ = [
    "REPOSITORY_URL",
    "__version__",
    "DataChecksumError",
    "DataError",
    "data_path",
    "load_manifest",
    "Precision",
    "choose_device",
    "choose_precision",
    "cpu_has_native_bf16",
    "cuda_has_native_bf16",
    "environment_report",
    "seed_everything",
    "set_deterministic",
    "set_threads",
    "setup_notebook",
    "show_source",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), _ALIASES.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'companion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
