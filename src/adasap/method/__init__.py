"""The method: sharpness-aware optimizers, neurons and their scores, physical removal."""
