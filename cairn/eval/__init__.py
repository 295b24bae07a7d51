"""Evaluation: perplexity and bits per byte, multiple choice by log-likelihood, greedy generation scored by match.
Every task is a client of an LLM (local or pool): it scores or generates through the engine, never the weights."""
