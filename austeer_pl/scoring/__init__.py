"""Scoring: multiple-choice log-likelihood, the one generation loop, the paper's scoring, behaviour
judges and fluency, and the statistics (Wilson intervals, McNemar's exact test).
"""
