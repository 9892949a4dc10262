"""Training machinery, apart from the models: the pure training step with its optimizer, schedule and
EMA (`step`), training-state checkpoints (`checkpoint`), start weights from any layout
(`start_weights`), and `parallelize`, the only place that applies torch.distributed wrappers.
"""
