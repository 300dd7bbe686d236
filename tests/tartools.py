"""Hand-made tar files for the data tests: exactly the members given, damaged ones included."""

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """Write ``(name, data)`` members into a plain tar file at ``path``."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
