"""Forward passes over source models: loading for calibration (bounded memory, 8-bit, FP8 read as stored),
capturing hidden states at the points the stages need, and the layer-by-layer dense forward."""
