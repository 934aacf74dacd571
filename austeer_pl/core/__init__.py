"""The steering core: where a model's units are (sites), token ids, batched last-token reads, streaming
momentum, selection, the saved state and its hooks, merging into weights, strengths, model loading and
atomic file output. Imports torch, transformers and safetensors only.
"""
