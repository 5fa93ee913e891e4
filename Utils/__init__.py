"""Small helpers of the DiffMM run: metrics, logging and device set-up, generated data, benchmark."""
