"""What a checkpoint save wrote: each file's size and CRC-32, in ``manifest.json`` of the iteration.

The trainer writes the manifest after every rank's files are on disk (and synced) and before it
moves ``latest_checkpointed_iteration.txt``, so an iteration with a manifest that matches its files
is complete and undamaged, and one without a manifest is either an interrupted save or a save of
an earlier version (which wrote none). CRC-32 (zlib) reads at memory speed and catches truncation,
flipped bits and replaced files; it is no defence against someone who rewrites the manifest too,
which is why loads still refuse pickled objects (weights-only loading).
"""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional

from megatron_rwkvx.checkpointing.megatron_format import write_text_atomic

MANIFEST_FILE = "manifest.json"
_FORMAT = 1
_BLOCK = 16 << 20  # zlib releases the GIL on large buffers: files are hashed in parallel threads


def _describe_one(path: str, sync: bool) -> Dict[str, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
        if sync:  # the manifest vouches for these bytes: they must be on disk before it is
            os.fsync(f.fileno())
    return {"size": size, "crc32": crc}


def describe_files(directory: str, names: Iterable[str], sync: bool = True) -> Dict[str, Dict[str, int]]:
    """{name: {"size", "crc32"}} of the files ``names`` in ``directory``."""
    names = list(names)
    with ThreadPoolExecutor(max(1, min(8, len(names)))) as pool:
        described = pool.map(lambda n: _describe_one(os.path.join(directory, n), sync), names)
        return dict(zip(names, described))


def manifest_candidates(directory: str):
    """The files a manifest of ``directory`` covers (everything but itself and temporaries)."""
    return sorted(n for n in os.listdir(directory)
                  if n != MANIFEST_FILE and not n.endswith(".tmp")
                  and os.path.isfile(os.path.join(directory, n)))


def write_manifest(directory: str, files: Dict[str, Dict[str, int]]) -> None:
    write_text_atomic(os.path.join(directory, MANIFEST_FILE),
                       json.dumps({"format": _FORMAT, "files": files}, indent=1, sort_keys=True))


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST_FILE))


def share(names: Iterable[str], rank: int, world: int) -> List[str]:
    """The files of ``names`` that ``rank`` of ``world`` checksums when the ranks of a job hash
    one iteration together (at a save, and when a resume verifies it)."""
    return sorted(names)[rank::world]


def damage(directory: str, rank: int = 0, world: int = 1) -> Optional[str]:
    """What is wrong with the files of ``directory`` against its manifest (the first damaged file
    named), or None when every file is as the save wrote it. Needs a manifest (``has_manifest``).
    With ``world`` > 1 only this rank's ``share`` of the files is checked: the other ranks check
    the rest (``training.checkpoint_integrity.shared_damage`` combines their verdicts)."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        expected = {str(n): (int(e["size"]), int(e["crc32"])) for n, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{path} is unreadable ({err})"
    mine = share(expected, rank, world)
    for name in mine:
        size = expected[name][0]
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            return f"{file} is missing (the save wrote {size} bytes)"
        actual = os.path.getsize(file)
        if actual != size:
            how = "cut short or replaced" if actual < size else "replaced or appended to"
            return f"{file} is {actual} bytes, the save wrote {size} ({how})"
    try:
        actual = describe_files(directory, mine, sync=False)
    except OSError as err:  # removed or unreadable between the look and the read
        return f"{err.filename or directory} cannot be read ({err.strerror or err})"
    for name in mine:
        if actual[name]["crc32"] != expected[name][1]:
            return (f"{os.path.join(directory, name)} does not hold what the save wrote (its "
                    "checksum differs: the file was changed or damaged)")
    return None
