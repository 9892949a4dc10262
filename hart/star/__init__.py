"""STAR (Ma et al. 2024, STAR-T2I): the second next-scale text-to-image family, beside `hart.transformer`.

Same folder shape as HART's: `config` (StarConfig + the released presets), `model` (STARForT2I:
cross-attention to the text, normalized 2-D RoPE, no text prefix) and `checkpoint` (the released
`.pth` trainer-dict layout, strict). Attention, RoPE and MLP layers come from `hart.layers`,
shared with HART; the tokenizer is VAR's VQVAE (`hart.tokenizer`, no residual path).
"""
