"""What the benchmarks (and the tests) share: where the real data lies, the machine a figure was measured on, and the
results pages they write into docs/."""

import datetime
import json
import os
import platform
from pathlib import Path

import monai
import torch

from pipeline import project_root
from pipeline.core import hardware

RESULTS = project_root() / "docs" / "results"


def shared_data() -> Path:
    """The real datasets for tests and benchmarks: $PIPELINE_SHARED_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("PIPELINE_SHARED_DATA", project_root().parent / "shared" / "data"))


def machine() -> dict:
    """CPU model and class, threads, GPU, versions and date: stated beside every figure."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": hardware.cpu_class(), "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "monai": monai.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}; GPU {m['gpu'] or 'none'}; torch {m['torch']}, MONAI {m['monai']}, "
            f"Python {m['python']}; {m['date']}.")


def write(name: str, data: dict, page: str, results: Path = RESULTS) -> Path:
    """docs/results/<name>.json (the figures) and <name>.md (the page the docs include); returns the page."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    path = results / f"{name}.md"
    path.write_text(page.rstrip() + "\n")
    return path
