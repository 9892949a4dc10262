"""STAR (Ma et al. 2024, STAR-T2I): the second next-scale text-to-image family, beside `hart.transformer`.

Same folder shape as HART's: `config` (StarConfig + the released presets), `model` (STARForT2I:
cross-attention to the text, normalized 2-D RoPE, no text prefix) and `checkpoint` (the released
`.pth` trainer-dict layout, strict), plus `generate` (STAR's sampling loop with CFG; its text encoder
is `hart.text_encoder.build_clip_text_encoder`). Attention, RoPE and MLP layers come from `hart.layers`,
shared with HART; the tokenizer is VAR's VQVAE (`hart.tokenizer`, no residual path).
"""
