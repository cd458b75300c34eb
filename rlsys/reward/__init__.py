"""Scoring: reward workers (``worker``: rule rewards, the fast reward model, the uncertainty
router), the reward model itself (``reward_model``), the routing rules (``routing``) and the
queued LLM judge (``judge``).
"""
