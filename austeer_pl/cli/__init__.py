"""The command lines (``train.py``, ``evaluate.py``, ``export.py``, ``generate.py``) and what they share:
run folders, tracking, one-line errors.
"""
