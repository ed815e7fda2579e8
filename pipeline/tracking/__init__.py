"""Everything MLflow: a run per training or evaluation (`runs`), the registry, and sweeps as one parent run with
nested jobs (`sweep`). The training loop reports to a Tracker and never imports MLflow."""
