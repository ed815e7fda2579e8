"""What the benchmarks share: the machine a figure was measured on, and the results pages they write into docs/."""

import datetime
import json
import platform
from pathlib import Path

import monai
import torch

from pipeline import hardware, project_root

RESULTS = project_root() / "docs" / "results"


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
