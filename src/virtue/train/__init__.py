"""Contrastive fine-tuning: data, loss, GradCache, adapters, the training loop."""
