"""Layers shared by the model families: norms, MLPs and AdaLN blocks, RoPE (1-D, HART 2-D, STAR
normalized 2-D), block-causal attention with its KV cache and cross-attention, and token sampling.

A model family (`hart.transformer`, and any other next-scale text-to-image transformer) builds on
these instead of carrying its own copies; where families differ, the layer takes a parameter.
"""
