"""The bottom layer: metrics, shared layers and kernels, graphs, flags, run set-up and folder, generated data, figures
(imports nothing above it)."""
