"""Turning user inputs into model tensors: images, text, SAM prompts, batches."""
