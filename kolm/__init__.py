"""kolm: distributed pretraining kit for Korean Phi causal language models."""

__version__ = "0.1.0"
