"""Read and write PyTorch ``.pt`` files (the zip format of torch >= 1.6) without torch.

A ``.pt`` file is a zip holding ``<archive>/data.pkl`` (a pickle whose tensors are
``torch._utils._rebuild_tensor_v2`` calls over persistent storage ids) and one raw little-endian file
per storage, ``<archive>/data/<key>``. Unpickling arbitrary files executes code, so the reader
resolves only the handful of globals a state dict or a DiT/SiT/REPA training dict needs and
refuses every other one. The writer emits the same layout (pickle protocol 2, as torch.save does),
which ``torch.load(weights_only=True)`` accepts.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
_ALIGN = 64  # torch aligns every record's data to 64 bytes so that files can be memory-mapped


class UnsafePickleError(ValueError):
    """The file references a Python global outside the state-dict allowlist."""


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only its dtype matters."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class _Namespace:
    """Inert stand-in for ``argparse.Namespace`` (DiT/SiT/REPA store their CLI args in checkpoints)."""


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a strided view of a flat storage.

    Contiguous tensors (all of a state dict's) stay read-only views of the storage bytes, so a
    multi-GB checkpoint is held in memory once; strided ones are copied out.
    """
    if offset < 0 or any(s < 0 for s in stride) or len(size) != len(stride):
        raise ValueError(f"invalid tensor layout: offset {offset}, size {size}, stride {stride}")
    if not size:
        return np.array(storage[offset])
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if min(size) > 0 and needed > storage.size:
        raise ValueError(f"tensor of size {size} stride {stride} at offset {offset} overruns its storage "
                         f"of {storage.size} elements")
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous) if n > 1):
        return storage[offset: offset + int(np.prod(size))].reshape(size)
    base = storage[offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * base.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): _Namespace,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, load_storage: Callable[[str, np.dtype, int], np.ndarray]):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _GLOBALS:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only tensors, storages, OrderedDict and "
                "argparse.Namespace may appear in a checkpoint read without torch")
        return _GLOBALS[(module, name)]

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"unsupported persistent id {pid!r} (expected a torch storage)")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def load(path: str | Path) -> Any:
    """Unpickle a torch zip checkpoint with tensors as NumPy arrays, refusing non-allowlisted globals."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip checkpoint (legacy pre-1.6 torch.save files and "
                         "TorchScript archives are not supported; re-save with torch.save(state_dict, f))")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl record, found {pickles or 'none'}")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big"
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                raw = archive.read(f"{prefix}data/{key}")
                if len(raw) < numel * dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, "
                                     f"need {numel * dtype.itemsize}")
                array = np.frombuffer(raw, dtype, count=numel)
                storages[key] = array.byteswap() if big_endian else array
            return storages[key]

        try:
            return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable torch checkpoint: {type(err).__name__}: {err}") from err


class _PickleWriter:
    """Protocol-2 pickle opcodes for the subset torch.load(weights_only=True) needs.

    Hand-written because pickling torch globals with the stdlib Pickler would require importing torch.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.storages: list[np.ndarray] = []

    def _global(self, module: str, name: str) -> None:
        self.out += f"c{module}\n{name}\n".encode()

    def _str(self, value: str) -> None:
        data = value.encode()
        self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    def _int(self, value: int) -> None:
        if -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def _int_tuple(self, items: tuple[int, ...]) -> None:
        self.out += b"("  # MARK
        for item in items:
            self._int(item)
        self.out += b"t"  # TUPLE

    def _tensor(self, array: np.ndarray) -> None:
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if array.dtype not in _STORAGE_NAMES:
            raise ValueError(f"cannot write dtype {array.dtype} to a .pt file")
        key = str(len(self.storages))
        self.storages.append(array)
        strides = tuple(s // array.itemsize for s in array.strides)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the argument tuple
        self.out += b"("  # MARK: persistent id ('storage', type, key, location, numel)
        self._str("storage")
        self._global("torch", _STORAGE_NAMES[array.dtype])
        self._str(key)
        self._str("cpu")
        self._int(array.size)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self._int(0)
        self._int_tuple(array.shape)
        self._int_tuple(strides)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self._global("collections", "OrderedDict")
        self.out += b")Rt"  # EMPTY_TUPLE, REDUCE: backward_hooks; TUPLE closes the arguments
        self.out += b"R"  # REDUCE

    def state_dict(self, tensors: Mapping[str, np.ndarray]) -> bytes:
        self._global("collections", "OrderedDict")
        self.out += b")R("  # OrderedDict(), MARK
        for key, array in tensors.items():
            self._str(key)
            self._tensor(array)
        self.out += b"u."  # SETITEMS, STOP
        return bytes(self.out)


def save(tensors: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write a flat {key: array} state dict as a torch zip checkpoint (what torch.save(state_dict) writes)."""
    path = Path(path)
    archive = path.stem or "archive"
    writer = _PickleWriter()
    pickled = writer.state_dict(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        _write_aligned(zf, f"{archive}/data.pkl", pickled)
        _write_aligned(zf, f"{archive}/byteorder", b"little")
        for i, array in enumerate(writer.storages):  # one storage's bytes in flight at a time
            _write_aligned(zf, f"{archive}/data/{i}", array.reshape(-1).view(np.uint8))
        _write_aligned(zf, f"{archive}/version", b"3\n")


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes | np.ndarray) -> None:
    """Pad the local header's extra field so the record's data starts on a 64-byte boundary."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    header_end = zf.fp.tell() + 30 + len(name.encode()) + 4  # 30-byte local header + 4-byte extra header
    pad = -header_end % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad  # torch's own padding field id
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)
