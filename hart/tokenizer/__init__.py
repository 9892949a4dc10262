"""The multi-scale tokenizer (VAR's VQ autoencoder, HART's hybrid variant) and its training objective.

`model.HybridTokenizer` is the entry point; `vae` and `quantizer` are its two halves,
`discriminator` and `perceptual` serve only `objective` (the tokenizer trainer's losses).
"""
