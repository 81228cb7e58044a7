"""What every loader of refit shares: the error that names a file and line, the options check, the
size limits checked before anything is read, UTF-8 decoding, the dense id-space rule and binary CSRs.

A leaf module (it imports nothing of refit), so the interaction loaders (:mod:`refit.data`) and the
sequence loaders (:mod:`refit.data.sequences`) both build on it; :mod:`refit.data` re-exports every name.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Dict, Optional, Sequence

import numpy as np
import scipy.sparse as sp


class DataFormatError(ValueError):
    """A data file that cannot be read as what it claims to be; says which file and line."""

    def __init__(self, path: str, line: Optional[int], message: str, what: str = "line"):
        self.path = str(path)
        self.line = line
        where = self.path if line is None else f"{self.path}, {what} {line}"
        super().__init__(f"{where}: {message}")


class DataOptionsError(TypeError, ValueError):
    """Options a data source does not take, named with the ones it does.

    A TypeError, as for any unknown keyword argument, and a ValueError, so
    that the command line reports it as bad input rather than a crash.
    """


# Limits checked before anything is read or allocated, so that a wrong path or value gets a sentence
# instead of a MemoryError after minutes. The largest published sets these loaders read (ML-10M's
# ratings.dat: 265 MB) are far below MAX_FILE_BYTES.
MAX_FILE_BYTES = 4 << 30
# The most memory one array a loader would build (the ids of a declared id space, the history windows of
# every target) may claim. Data sets of the papers' size need a few GB at most (ml-1m_seq's 994,169
# targets with windows of 200 items: 1.6 GB), and 32 GiB is a quarter of the machines it runs on.
MAX_DATA_BYTES = 32 << 30


def _bytes(n: int) -> str:
    """n bytes in words: '8.0 TiB (8796093022208 bytes)'."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def _regular_file(path: str) -> int:
    """The size of path, refused before any read when it is not a regular file (a device such as
    /dev/zero, or a FIFO, would be read forever or block) or is larger than MAX_FILE_BYTES."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise DataFormatError(path, None, f"not a regular file ({kind}); data is read from regular files only")
    if st.st_size > MAX_FILE_BYTES:
        raise DataFormatError(path, None, f"the file holds {_bytes(st.st_size)}, more than the "
                                          f"{_bytes(MAX_FILE_BYTES)} a data file may have "
                                          "(refit.data.formats.MAX_FILE_BYTES)")
    return st.st_size


def _refuse_unknown(where: str, options: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataOptionsError(f"{where}: unknown options: {', '.join(unknown)} "
                               f"(accepted: {', '.join(sorted(allowed))})")


# DiffRec's ids are dense indices 0..n-1. Without declared sizes the id space (the largest id + 1) may be
# at most DENSE_ID_FACTOR times the number of distinct ids, or DENSE_ID_FLOOR, whichever is larger: a
# corrupt id then gets a message naming it instead of a matrix of absurd size.
DENSE_ID_FACTOR = 2
DENSE_ID_FLOOR = 1 << 20


def _decode(path: str, raw: bytes, first_line: int = 1, strip_bom: bool = True) -> str:
    """``raw`` as UTF-8 text; a leading byte order mark, as some editors write, is dropped.

    first_line: the line of the file ``raw`` starts on, so that a decoding error
    names its line in the whole file. strip_bom: False for a piece after the file's start.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw[: exc.start].count(b"\n")
        raise DataFormatError(path, line, f"not UTF-8 text ({exc.reason})") from None
    return text[1:] if strip_bom and text.startswith("\ufeff") else text


def binary_csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR with a 1 at every (user, item) pair; duplicates count once."""
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.sort_indices()
    m.data[:] = 1.0
    return m
