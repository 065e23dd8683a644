"""pwff: personalized wireless federated fine-tuning of language models (a Flower app)."""

__version__ = "0.1.0"
