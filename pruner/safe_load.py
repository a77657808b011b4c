"""Reading a run folder without running what it contains.

Run folders are copied between machines and shared, so every file in one is untrusted input. A
pickle runs code while it loads (any `__reduce__` may name `os.system`), so no file of a run
folder goes through an unrestricted unpickler:

- trainer state is JSON (`trainer-rank<r>.json`); a checkpoint of an older version (`.pt`) is
  read with `torch.load(weights_only=True)`, which builds tensors and plain containers only;
- the DCP metadata file (`.metadata`, a pickle by torch's design) goes through `_MetadataUnpickler`,
  which resolves only torch's checkpoint metadata classes, by name, and refuses anything else;
- the DCP data files' non-tensor entries (torch reads them with `weights_only=False`) go through
  `SafeLoadPlanner` (`weights_only=True`); torch already reads their tensors that way;
- old-log-prob caches, training sets and exports are safetensors and JSON, which carry no code.

A refused file raises `UnsafeFileError` naming the file and what it tried to load. A file that is
merely incomplete or corrupt raises `DamagedFileError`, which callers may recover from (an
earlier checkpoint, a recomputed cache); a crafted file is never silently skipped.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

METADATA_FILE = ".metadata"

# What torch's FileSystemWriter pickles into `.metadata` (torch 2.4-2.13), by module and name.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # torch.layout's pickle form: a lookup by name
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeFileError(RuntimeError):
    """A run-folder file holds something other than data (a crafted pickle): refused, never run."""


class DamagedFileError(ValueError):
    """A run-folder file is incomplete or corrupt (a kill mid-write, a truncated copy)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves the DCP metadata classes and torch dtypes only; any other global is refused by name."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFileError(f"{self.path}: refused to load {module}.{name}: a checkpoint metadata file holds only "
                              "torch.distributed.checkpoint metadata, so this one was made to run code. Do not "
                              "resume from this checkpoint; delete it, or ask whoever gave you the folder")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self.path}: refused a persistent id in a checkpoint metadata file")


def read_dcp_metadata(path: Path) -> Metadata:
    """The `Metadata` of the DCP checkpoint `path` (a folder, or its `.metadata` file), checked:
    only metadata classes, and every data file named a plain file of the checkpoint's own folder."""
    file = path / METADATA_FILE if path.is_dir() else path
    try:
        with file.open("rb") as fh:
            metadata = _MetadataUnpickler(fh, file).load()
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise DamagedFileError(f"{file}: missing (the checkpoint was not written completely)") from None
    except Exception as exc:  # truncated or corrupt pickle: EOFError, UnpicklingError, ValueError...
        raise DamagedFileError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise DamagedFileError(f"{file}: holds {type(metadata).__name__}, not checkpoint metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise UnsafeFileError(f"{file}: refused data file name {name!r}: a checkpoint reads only files of its "
                                  "own folder")
    return metadata


def check_dcp_files(path: Path, metadata: Metadata) -> None:
    """Every byte range the metadata names lies inside an existing data file (a truncated copy fails here,
    before any weight is read)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, end in sorted(needed.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"{size} bytes"
            raise DamagedFileError(f"{file}: {found}, the metadata needs {end} bytes (truncated or incomplete copy)")


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP reader, handing out metadata already read through the restricted unpickler
    (torch's own read_metadata unpickles the file; on a failure it also falls back to per-rank
    metadata files and turns the first error into a bare AssertionError)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self.checked = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # a per-rank metadata file: read it through the same gate
            return read_dcp_metadata(Path(self._get_metadata_path(kwargs["rank"])))
        if getattr(self.checked, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            self.checked.storage_meta = StorageMeta()
        self.checked.storage_meta.load_id = self.load_id
        return self.checked


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, with non-tensor entries (optimizer hyper-parameters) read as weights only."""

    def __init__(self, checkpoint: Path):
        super().__init__()
        self.checkpoint = checkpoint

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
        where = self.checkpoint / (info.relative_path if info is not None else "?")
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(f"{where}: refused entry {read_item.dest_index.fqn}: {_refusal(exc)}. Do not "
                                  "resume from this checkpoint; delete it, or ask whoever gave you the folder") from None
        self._store(read_item, obj)

    def _store(self, read_item: Any, obj: Any) -> None:
        """Where DefaultLoadPlanner.load_bytes puts the value."""
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _refusal(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its long message: the global it names."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"[Uu]nsupported operand ([\w.]+)", str(exc))
    if found:
        return f"it loads {found.group(1)}, which is not data (a crafted pickle)"
    return f"not a weights-only pickle ({str(exc).splitlines()[0][:200]})"


def unwrap_checkpoint_error(exc: BaseException) -> BaseException:
    """The first UnsafeFileError/DamagedFileError inside torch's CheckpointException (which gathers every
    rank's failure), else `exc` itself."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, (UnsafeFileError, DamagedFileError)):
            return inner
    return exc


def load_weights_only(path: Path) -> Any:
    """A torch.save file (an older version's trainer state) as tensors and plain containers only; the
    RNG states of numpy are allowlisted by name."""
    import numpy as np

    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it; 1.x has only np.core
    reconstruct = core.multiarray._reconstruct
    try:
        with torch.serialization.safe_globals(allowed + [reconstruct]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"{path}: refused: {_refusal(exc)}. Do not resume from this checkpoint; delete it, "
                              "or ask whoever gave you the folder") from None
    except (EOFError, RuntimeError, OSError) as exc:
        raise DamagedFileError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
