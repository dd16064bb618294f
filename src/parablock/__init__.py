"""ParaBlock: communication-computation parallel block coordinate federated fine-tuning of LLMs."""

__version__ = "0.1.0"
