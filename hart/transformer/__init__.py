"""HART's transformer family, in the model-folder shape: `model` (HARTForT2I), `objective`
(the text-to-image losses), `checkpoint` (the released `llm/` folder format, both ways),
`diffusion_head` + `diffusion` (the residual head and its Gaussian diffusion), `generate` (sampling
loop). Shared layers come from `hart.layers`.
"""
