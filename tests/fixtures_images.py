"""Session fixtures for the images layer."""
