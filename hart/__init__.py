"""HART model library: plain single-device PyTorch, no Ray/MLflow/boto3.

Public entry points live in their modules (import what you need, nothing heavy runs at import):
`hart.config` (typed configs + presets), `hart.tokenizer.model.HybridTokenizer`,
`hart.transformer.model.HARTForT2I`, `hart.text_encoder.build_text_encoder`, `hart.transformer.generate.generate`;
STAR: `hart.star.model.STARForT2I`, `hart.text_encoder.build_clip_text_encoder`, `hart.star.generate.generate`.
Both families' samplers return `hart.layers.sampling.Samples` (docs/models.md, "Sampling API").
"""
