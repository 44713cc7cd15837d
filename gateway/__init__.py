"""Swapper Gateway: an OpenAI-compatible reverse proxy that swaps local models in and out."""

__version__ = "0.1.0"
