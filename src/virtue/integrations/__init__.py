"""Adapters for the tools VIRTUE users already run: sentence-transformers, mteb."""
