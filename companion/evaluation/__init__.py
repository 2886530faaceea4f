"""Evaluation (chapter 9): perplexity and bits per character/byte, classification metrics with bootstrap
intervals, text metrics (BLEU, chrF, ROUGE, Chinese-aware), multiple choice by log-likelihood, calibration."""

from companion.evaluation.bootstrap import BootstrapCI, bootstrap_ci
from companion.evaluation.calibration import (
    CalibrationBins,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_diagram,
    softmax,
)
from companion.evaluation.classification import PRF, accuracy, confusion_matrix, f1_score, precision_recall_f1
from companion.evaluation.likelihood import (
    ChoiceScores,
    MultipleChoice,
    continuation_logprobs,
    score_multiple_choice,
    split_continuation,
)
from companion.evaluation.perplexity import PerplexityResult, evaluate_perplexity, sequence_nll, window_spans
from companion.evaluation.questions import arithmetic_questions, next_line_questions
from companion.evaluation.text import BLEUResult, RougeScore, corpus_bleu, corpus_chrf, lcs_length, rouge, rouge_tokens

__all__ = [
    "BootstrapCI", "bootstrap_ci",
    "CalibrationBins", "calibration_bins", "expected_calibration_error", "fit_temperature", "nll",
    "reliability_diagram", "softmax",
    "PRF", "accuracy", "confusion_matrix", "f1_score", "precision_recall_f1",
    "ChoiceScores", "MultipleChoice", "continuation_logprobs", "score_multiple_choice", "split_continuation",
    "PerplexityResult", "evaluate_perplexity", "sequence_nll", "window_spans",
    "arithmetic_questions", "next_line_questions",
    "BLEUResult", "RougeScore", "corpus_bleu", "corpus_chrf", "lcs_length", "rouge", "rouge_tokens",
]
