"""Dataset check entry point: `python -m pipeline.check data.root=...` lists every fault of a dataset at once.

Parses the config and calls pipeline.data.checks.check; exits 1 when there is any fault.
"""

import sys

from omegaconf import DictConfig

from pipeline.core.config import entry_point
from pipeline.data.checks import check, log_report


@entry_point("train")
def main(cfg: DictConfig) -> None:
    report = check(cfg)
    log_report(cfg.data.root, report)
    if report["faults"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
