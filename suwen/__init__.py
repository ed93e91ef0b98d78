"""Suwen: a local, agentic retrieval-augmented assistant for medical images and questions."""

__version__ = "0.1.0"
