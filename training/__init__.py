"""Training code for simserve: data sources, pair sampling, losses, loop, evaluation.

Never imported by the serving path.
"""
