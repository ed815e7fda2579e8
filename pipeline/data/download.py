"""Public datasets in one command: an MSD task (or any archive URL) downloaded and unpacked with MONAI's own helpers
(`monai.apps.download_url`, `extractall`: md5 verified before anything is unpacked), then checked.

A download goes to a temporary file and is kept only when its md5 matches; an interrupted run re-uses a complete
archive and downloads again otherwise. Unpacking goes to a temporary folder beside the target, renamed into place
in one step: a failure leaves no half-unpacked dataset.
"""

import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from monai.apps import DecathlonDataset
from monai.apps.utils import HashCheckError, download_url, extractall

from pipeline.core.errors import InputError, first_line

log = logging.getLogger(__name__)


def msd_source(task: str) -> tuple[str, str]:
    """(archive URL, md5) of a Medical Segmentation Decathlon task, as MONAI's DecathlonDataset knows them."""
    if task not in DecathlonDataset.resource:
        raise InputError(f"task={task}: not an MSD task ({', '.join(sorted(DecathlonDataset.resource))}); "
                         "for another dataset give url= and md5=")
    return DecathlonDataset.resource[task], DecathlonDataset.md5[task]


def fetch(task: str, root: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """<root>/<task>: downloaded (url=None: the MSD task's archive), md5-checked and unpacked; kept if already there."""
    root = Path(root)
    target = root / task
    if (target / "dataset.json").is_file():
        log.info(f"{target}: already there (dataset.json found); nothing downloaded")
        return target
    if url is None:
        url, md5 = msd_source(task)
    if not md5:
        raise InputError(f"url={url}: give its md5= too; an archive is unpacked only once its checksum matches")
    archive = root / ".downloads" / (Path(urlparse(url).path).name or f"{task}.tar")
    archive.parent.mkdir(parents=True, exist_ok=True)
    if archive.exists():  # a complete archive from an earlier run is re-used; anything else downloads again
        try:
            download_url(url, archive, hash_val=md5, hash_type="md5")
        except HashCheckError:
            log.warning(f"{archive}: md5 differs from {md5} (an earlier, broken download); downloading again")
            archive.unlink()
    try:
        download_url(url, archive, hash_val=md5, hash_type="md5")
    except HashCheckError:
        raise InputError(f"{url}: md5 of the download differs from {md5} (corrupt or incomplete); "
                         "nothing was kept or unpacked") from None
    except (RuntimeError, OSError) as err:
        raise InputError(f"{url}: download failed ({first_line(err)}); nothing was unpacked, "
                         "run again to retry") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=f".unpack-{task}-") as tmp:
        try:
            extractall(archive, tmp, hash_val=md5, hash_type="md5", has_base=False)
        except Exception as err:  # tarfile, zipfile and MONAI raise many types for a broken archive
            raise InputError(f"{archive}: not a readable archive ({first_line(err)}); nothing was unpacked") from None
        found = [p.parent for p in sorted(Path(tmp).glob("*/dataset.json"))]  # MSD archives: <task>/dataset.json
        found += [Path(tmp)] if (Path(tmp) / "dataset.json").is_file() else []
        if not found:
            raise InputError(f"{archive}: holds no dataset.json (at its top or one folder down); nothing was unpacked")
        os.replace(found[0], target)  # one step: the dataset appears whole or not at all
    log.info(f"{target}: unpacked from {url}")
    return target
