"""Downloads verified by checksum: a corrupt file is removed, an offline machine gets a hint."""

from __future__ import annotations

import hashlib
import urllib.request
import zipfile
from pathlib import Path

from finetune.errors import DownloadError


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, target: Path, sha1: str, offline_hint: str) -> Path:
    """Fetches `url` to `target` unless a verified copy is there; never leaves a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        partial = target.with_name(target.name + ".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as err:  # URLError, HTTPError, socket errors
            partial.unlink(missing_ok=True)
            raise DownloadError(f"Could not download {url} ({err}). {offline_hint}") from err
        partial.rename(target)
    actual = sha1_of(target)
    if actual != sha1:
        target.unlink()
        raise DownloadError(
            f"{target} is corrupt (SHA-1 {actual}, expected {sha1}); it was removed, run again to re-download. "
            f"{offline_hint}"
        )
    return target


def extract_zip(archive: Path, into: Path, folder: str) -> Path:
    """Extracts `archive` so that `into/folder` appears only once extraction has finished."""
    staging = into / f".{folder}.extracting"
    with zipfile.ZipFile(archive) as zip_file:
        zip_file.extractall(staging)
    (staging / folder).rename(into / folder)
    staging.rmdir()
    return into / folder
