"""Which prompts to roll out and how many times: the budget scheduler actor (``scheduler``), the
knapsack and dynamic-sampling rules it applies (``allocation``), and the staged sampling
protocol the rollout loops run (``sampling``).
"""
