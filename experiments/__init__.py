"""Experiment files: `get_config(arg=None)` (+ optional `get_sweep(arg=None)`), one per question."""
