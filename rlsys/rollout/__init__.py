"""Rollout workers: a vLLM engine per worker (``worker``), its process and memory settings
(``engine``), and how published weights reach it (``weight_sync``).
"""
