"""Evaluation: SCaR and MMEB tasks, metrics (ties count against the positive), caches, baselines, reports."""
