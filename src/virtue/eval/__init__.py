"""Evaluation: SCaR and MMEB tasks read into tables of unique inputs, metrics (ties count against the positive,
candidates named like it count as it), caches, baselines, reports, and several processes under torchrun."""
