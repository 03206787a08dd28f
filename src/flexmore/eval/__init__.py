"""Evaluation: lm-eval bridge (engine.py), local JSONL tasks (local.py), benchmark groups (groups.py),
results store (store.py) and the mixture sweep (sweep.py)."""
