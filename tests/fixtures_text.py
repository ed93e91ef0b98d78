"""Session fixtures for the text layer."""
