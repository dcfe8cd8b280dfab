"""What an attacker who controls a checkpoint directory can write: payloads inside torch's own zip format, and a
manifest recomputed over whatever the directory now holds (sha256 and sizes fixed up, as anyone can)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import torch


def torch_zip(data_pkl: bytes) -> bytes:
    """A file torch.load reads as its zip format, whose pickle is ``data_pkl`` (the other records are torch's)."""
    real = io.BytesIO()
    torch.save({"x": 1}, real)
    crafted = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(real.getvalue())) as source, zipfile.ZipFile(crafted, "w") as target:
        for record in source.infolist():
            data = data_pkl if record.filename.endswith("/data.pkl") else source.read(record.filename)
            target.writestr(record.filename, data, compress_type=zipfile.ZIP_STORED)
    return crafted.getvalue()


def reseal(final: Path, *names: str) -> None:
    """Fix ``final``'s manifest for ``names`` (default: every regular file in it) as an attacker would: sha256 and
    size recomputed (through a symlink too), a name listed that was not."""
    meta = json.loads((final / "meta.json").read_text())
    present = sorted(
        path.relative_to(final).as_posix()
        for path in final.rglob("*")
        if path.is_file() and not path.is_symlink() and path.name != "meta.json"
    )
    for name in names or present:
        meta["files"][name] = hashlib.sha256((final / name).read_bytes()).hexdigest()
        meta.setdefault("sizes", {})[name] = (final / name).stat().st_size
    (final / "meta.json").write_text(json.dumps(meta))
