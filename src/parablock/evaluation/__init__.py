"""Held-out loss, perplexity and accuracy by generation."""
