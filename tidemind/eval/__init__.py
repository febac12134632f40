"""Evaluation of models and their quantized copies: perplexity (P1), KL divergence and top-1
agreement against the unquantized model (ppl.py)."""
