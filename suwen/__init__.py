"""Suwen: a local, agentic retrieval-augmented assistant for medical images and questions."""

import logging

__version__ = "0.1.0"

# A library stays quiet unless its user configures logging; the CLI sends these records to the
# data home's log (suwen.logs). Without this, Python's last-resort handler would print them.
logging.getLogger("suwen").addHandler(logging.NullHandler())
