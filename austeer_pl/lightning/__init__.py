"""PyTorch Lightning around the fit session: the module (each hook one call of the session), the data
module that serves contrastive pairs, and the strategy, checkpoint and resume checks.
"""
