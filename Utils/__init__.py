"""The bottom layer: metrics, shared layers and kernels, run set-up, generated data, figures (imports nothing above it)."""
