"""Toy-side code, kept apart from the runtime: the built-in arithmetic tasks and the JSONL task
format (``arithmetic``), the tiny policy model built and warm-started locally (``tinymodel``),
and the small preference model the reward router uses on the built-in task
(``preference_model``).
"""
