"""The paper's analyses (``analyze.py``): unit sweeps and combinations, strength curves, promoted
tokens, sign policies and behaviour curves, each written as JSON and a plot.
"""
