"""The learner: DeepSpeed ranks (``rank``), the batch they train on (``batch``), the losses and
advantages (``losses``) and their configuration (``config``).
"""
