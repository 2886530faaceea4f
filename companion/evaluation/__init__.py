"""Evaluation (chapter 9): perplexity and bits per character/byte, classification metrics with bootstrap
intervals, text metrics (BLEU, chrF, ROUGE, Chinese-aware), multiple choice by log-likelihood, calibration."""
