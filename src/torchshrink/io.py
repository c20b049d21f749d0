"""Safe loading and atomic saving of files.

Writing: everything goes to a temporary name in the destination folder and is renamed into
place only when complete, so an interrupted run never leaves a half-written file behind.
Reading: weights come from safetensors or from ``torch.load(weights_only=True)``; nothing that
could execute code is loaded unless the caller says it trusts the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors

from torchshrink.errors import CorruptFileError, MissingFileError, OutputPathError, UntrustedPickleError

__all__ = [
    "folder_listing",
    "encode_sparse",
    "decode_sparse",
    "atomic_path",
    "write_text_atomic",
    "write_json_atomic",
    "save_tensors",
    "load_tensors",
    "read_safetensors_metadata",
    "load_state_dict_file",
    "file_kind",
    "prepare_output_folder",
    "prepare_output_file",
]


PACKED_MAGIC = b"TSHRINK\x00"  # first bytes of a packed .tshrink file (torchshrink.encoding.packfile)
SPARSE_KEY = "sparse"
_MASK_SUFFIX = ".__mask__"
SPARSE_MAX_DENSITY = 0.9  # above this a bitmask plus values is not smaller than the dense tensor


def encode_sparse(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store mostly-zero float tensors as a packed bitmask plus their non-zero values.

    Returns the tensors to save and the metadata entry that lists the encoded ones (name -> shape),
    so a pruned model's file is as small as its sparsity allows (1 bit per position + the values).
    """
    out: dict[str, torch.Tensor] = {}
    sparse: dict[str, list[int]] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.is_floating_point() and t.numel() >= 64:
            mask = t.reshape(-1) != 0
            if int(mask.sum()) <= SPARSE_MAX_DENSITY * t.numel():
                packed = np.packbits(mask.numpy())
                out[name] = t.reshape(-1)[mask].clone()
                out[name + _MASK_SUFFIX] = torch.from_numpy(packed)
                sparse[name] = list(t.shape)
                continue
        out[name] = t
    return out, ({SPARSE_KEY: json.dumps(sparse)} if sparse else {})


def decode_sparse(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Undo :func:`encode_sparse`: dense tensors with zeros back in place."""
    sparse = json.loads(metadata.get(SPARSE_KEY, "{}"))
    out = {k: v for k, v in tensors.items() if not k.endswith(_MASK_SUFFIX)}
    for name, shape in sparse.items():
        numel = int(np.prod(shape))
        mask = torch.from_numpy(np.unpackbits(tensors[name + _MASK_SUFFIX].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=tensors[name].dtype)
        dense[mask] = tensors[name]
        out[name] = dense.reshape(shape)
    return out


def prepare_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (parents too) and check that it can be written, before any work is done: a
    file in its place, a file above it or a folder without write permission is a named error."""
    path = Path(path)
    for where in (path, *path.parents):
        if where.exists() and not where.is_dir():
            what = "is a file" if where == path else f"lies under {where}, which is a file"
            raise OutputPathError(path, f"{option} {what}", "give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputPathError(
            path, f"{option} cannot be written ({exc.strerror or exc})", "choose a writable folder"
        ) from None
    return path


def prepare_output_file(path: str | Path, option: str = "--out") -> Path:
    """Check an output file's path before any work: not a folder, its folder usable (created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, f"{option} is a folder", "give a file name, for example model.onnx")
    prepare_output_folder(path.parent, option=f"the folder of {option}")
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: object) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save tensors as safetensors (atomically). Shared storage is copied so any state_dict works."""
    plain = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        _save_safetensors(plain, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming the path when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "safetensors file")
    try:
        return _load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(
            path, f"not a readable safetensors file: {exc}", "re-create or re-download it"
        ) from exc


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read by safetensors itself (header only, no tensor
    data); a file it cannot parse is a named error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(path, f"not a readable safetensors file: {exc}") from None


def folder_listing(directory: str | Path, limit: int = 12) -> str:
    """The first names in a folder, for an error that says what it holds instead of what was wanted."""
    names = sorted(p.name for p in Path(directory).iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def file_kind(path: str | Path) -> str:
    """Guess what a model file is from its content: safetensors, packed, onnx, torchscript, torch or unknown."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "model file")
    if path.suffix == ".onnx":
        return "onnx"
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[:8] == PACKED_MAGIC:
        return "packed"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch"
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return "torch"
    return "unknown"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict from safetensors or a ``torch.save`` file, never executing code.

    A file that holds a whole pickled module (not a state_dict) is refused with
    :class:`UntrustedPickleError`; load it through ``load_model(..., trust_pickle=True)`` instead.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind == "packed":
        raise CorruptFileError(
            path, "a packed .tshrink file: read it with torchshrink.models.load_weights_file"
        )
    if kind == "safetensors":
        tensors = load_tensors(path)
        metadata = read_safetensors_metadata(path)
        try:
            return decode_sparse(tensors, metadata) if SPARSE_KEY in metadata else tensors
        except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(path, f"sparse tensors cannot be decoded: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        with path.open("rb") as fh:
            head = fh.read(2)
        pickled = "unsupported global" in text.lower() or (
            len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
        )
        if not pickled:  # garbage (or damaged), not a pickle of Python objects
            raise CorruptFileError(path, "not a readable torch file (the pickle data is damaged)") from None
        reason = next(
            (line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")), ""
        )
        raise UntrustedPickleError(
            f"{path}: holds pickled Python objects (for example a whole nn.Module) that the safe loader "
            f"refuses{f' ({reason})' if reason else ''}, and loading them can execute code. If you trust "
            "this file, pass --trust-pickle (recipe: model.trust_pickle: true); better, save "
            "model.state_dict() with safetensors and load it with a factory."
        ) from None
    except Exception as exc:  # torch.load raises many types (KeyError, RuntimeError, ...) on bad files
        raise CorruptFileError(path, f"not a readable torch file: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(path, "does not hold a state_dict (a mapping of names to tensors)")
    return obj
