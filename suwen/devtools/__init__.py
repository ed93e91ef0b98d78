"""Offline builders of tiny random models for tests and demos (no downloads)."""
