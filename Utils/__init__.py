"""The bottom layer, one concern per module (docs/code.md): batches, metrics, shared layers and kernels, graphs, flags,
the device, seeding, the command line, the run folder, files, generated data, figures (imports nothing above it)."""
