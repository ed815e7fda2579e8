"""What every stage stands on: one-line errors, atomic files, the hardware and its precision, processes (DDP,
signals), logs, config composition and run folders. Imports nothing else of the pipeline."""
