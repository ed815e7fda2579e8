"""From a config to a trained checkpoint: planning from the data (`planning`, `completion`), the run and its
tracking (`run`), the loop (`engine`) with its hooks (`callbacks`), and our losses (`losses`)."""
