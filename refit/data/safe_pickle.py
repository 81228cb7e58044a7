"""Restricted unpickling: every pickle that refit reads from a file goes through this module.

Nothing in a file may run code. Each reader admits an exact list of (module,
name) pairs, never whole modules, and refuses anything else with an error
that names the file, before any of it runs:

* :func:`read_plain_pickle`: a pickle of plain containers, numbers and
  strings (``dataset.pkl`` of DiffuRec / ICLRec / DuoRec), with a bound on
  what it may build per byte of the file (:data:`PICKLE_ELEMENTS_PER_BYTE`)
  and on how deep it may nest;
* :func:`read_dataframe`: a pickled pandas DataFrame (DreamRec's ``.df``
  files), checking the arguments of every call and the state of every
  object it builds;
* :func:`read_pickle`: a RecBole file (``torch.save`` or plain pickle), its
  classes replaced by inert :class:`Opaque` stand-ins that keep their data,
  and written back with the original classes (``torch.save(...,
  pickle_module=RECBOLE_PICKLE_MODULE)``).

Checkpoints of refit itself are read by :func:`refit.runtime.runs.load_checkpoint`
(torch's ``weights_only`` loader, with its own checks).
"""

from __future__ import annotations

import builtins
import codecs
import collections
import copyreg
import datetime
import io
import itertools
import logging
import math
import os
import pickle
import types
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .formats import MAX_FILE_BYTES, DataFormatError, _bytes, _regular_file

log = logging.getLogger(__name__)

PANDAS_HINT = "reading DreamRec .df files needs pandas, which is not installed: pip install pandas"


# --- plain pickles and pandas DataFrames (sequence data) ---------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """What the restricted unpicklers raise: the pickle asks for something outside the allow-list."""


# How much a pickle may build. A pickle can make a list once and refer to it again at two bytes a
# reference (a memo get), and the loaders expand every reference: a 53 KB dataset.pkl became 9 million
# ids. So the unpicklers count what they build -- every item put into a list, tuple, dict or set, every
# array element, every reference to an earlier object at that object's size (a list referenced N times
# counts N times) -- and refuse a file that builds more than PICKLE_ELEMENTS_PER_BYTE elements per byte
# of the file, or PICKLE_MIN_ELEMENTS for a small one. An honest pickle spends a byte or more on every
# element (an id takes 2 to 9 bytes): ml-1m_seq's dataset.pkl counts 1,046,206 elements in 3,101,987
# bytes (0.34 a byte), zhihu's train_data.df 1,356,180 in 3,069,766 (0.44; its other .df files the
# same), 47 and 36 times below the bound. A crafted file of n bytes can still make the loaders hold
# 16 n elements, some 50 bytes each as Python and NumPy objects: 800 MB for a 1 MB file.
PICKLE_ELEMENTS_PER_BYTE = 16
PICKLE_MIN_ELEMENTS = 1_000_000
# Containers nested deeper than this are refused (the formats nest 3 deep; deeper nesting ends in a
# RecursionError wherever the structure is walked, and a container that holds itself is infinitely deep).
PICKLE_MAX_DEPTH = 100

_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
_SIZED = _CONTAINERS | {str, bytes, bytearray}


class _Budget:
    """The elements one pickle of ``size`` bytes may still build (see PICKLE_ELEMENTS_PER_BYTE)."""

    __slots__ = ("size", "limit", "used")

    def __init__(self, size: int):
        self.size = int(size)
        self.limit = max(PICKLE_MIN_ELEMENTS, PICKLE_ELEMENTS_PER_BYTE * self.size)
        self.used = 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise _Refused(f"it builds more than {self.limit} elements (items of lists, tuples, dicts and arrays, "
                           "each reference to an earlier one counting its whole size again), the most a file of "
                           f"{self.size} bytes may build: max({PICKLE_MIN_ELEMENTS}, {PICKLE_ELEMENTS_PER_BYTE} x "
                           "its size)")


def _weight(x: Any) -> int:
    """What a reference to x costs: the elements a reader that expands it would go through."""
    t = type(x)
    if t in _CONTAINERS:
        return len(x) + 1
    if t in (str, bytes, bytearray):
        return len(x) // 8 + 1  # a buffer referenced again may be copied into another array
    if t is np.ndarray:
        return x.size + 1
    return 1


def _counted_call(make: Callable, budget: _Budget) -> Callable:
    """make, counting the size of its arguments: list(x) and dict(x) copy x, and a shared x costs the
    pickle two bytes however large it is."""
    def call(*args):
        budget.spend(1 + sum(len(a) for a in args if type(a) in _SIZED))
        return make(*args)

    call.__qualname__ = getattr(make, "__qualname__", "call")
    return call


def _count_plain(obj: Any, budget: _Budget) -> None:
    """Counts every container reachable from obj as the loader will go through it -- a shared one at
    each reference -- and refuses nesting deeper than PICKLE_MAX_DEPTH. Iterative: no recursion, and
    every step spends from the budget, so the walk itself stays bounded."""
    stack = [(obj, 1)] if type(obj) in _CONTAINERS else []
    while stack:
        x, depth = stack.pop()
        if depth > PICKLE_MAX_DEPTH:
            raise _Refused(f"containers are nested more than {PICKLE_MAX_DEPTH} deep (or one holds itself); this "
                           "format nests dicts and lists 3 deep")
        budget.spend(len(x) + 1)
        for part in ((x.keys(), x.values()) if type(x) is dict else (x,)):
            try:
                # A TypeError for any container (or str) in part, so lists of ids pass at C speed; fsum
                # rather than sum, which would add huge ints (OverflowError here) at their full length.
                math.fsum(part)
                continue
            except (TypeError, OverflowError, ValueError):
                pass
            if not _CONTAINERS.isdisjoint(set(map(type, part))):
                stack.extend((v, depth + 1) for v in part if type(v) in _CONTAINERS)


def _kind(x: Any) -> str:
    """What x is, in words, read from its type only (the attributes of a half-built object may fail)."""
    if isinstance(x, type):
        return f"the class {x.__module__}.{x.__qualname__}"
    if isinstance(x, (types.FunctionType, types.BuiltinFunctionType)):
        return f"{x.__module__}.{x.__qualname__}"
    return f"a {type(x).__module__}.{type(x).__qualname__} object"


class _PlainUnpickler(pickle.Unpickler):
    """dataset.pkl: dicts, lists and ints. No global but builtins dict / list / int can be named, so
    no code can be reached (protocol opcodes build the containers themselves). Calls of those three are
    counted in ``budget`` (the C unpickler has no other hook; :func:`_count_plain` counts the rest)."""

    def __init__(self, file, budget: _Budget):
        super().__init__(file)
        self._budget = budget

    def find_class(self, module, name):
        obj = _PLAIN_GLOBALS.get((module, name))
        if obj is None:
            raise _Refused(f"the pickle asks for {module}.{name}; this format holds only dicts, lists and ints")
        return _counted_call(obj, self._budget)

    def persistent_load(self, pid):
        raise _Refused("the pickle refers to a persistent object; this format holds only dicts, lists and ints")


_PLAIN_GLOBALS = {(m, n): t for m in ("builtins", "__builtin__") for n, t in (("dict", dict), ("list", list),
                                                                               ("int", int))}


def _refuse_extension(self):
    raise _Refused("the pickle uses an extension code (copyreg), which could name any object")


class _PlainPyUnpickler(pickle._Unpickler):
    """:class:`_PlainUnpickler` in Python, for when extension codes are registered in this process: their
    cached objects would reach the C unpickler's stack without passing through find_class."""

    find_class = _PlainUnpickler.find_class
    persistent_load = _PlainUnpickler.persistent_load
    dispatch = dict(pickle._Unpickler.dispatch)
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension

    def __init__(self, file, budget: _Budget):
        super().__init__(file)
        self._budget = budget

# Exact types accepted as ids inside the ``seq`` lists of a .df file (DreamRec's own files mix Python ints
# with NumPy int64 and, in YooChoose and KuaiRec, float64 scalars).
_ID_TYPES = frozenset({int, float, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                       np.uint64, np.float32, np.float64})
_DTYPE_CODES = frozenset({"O8", "O4", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f4", "f8"})
_INDEX_DTYPES = frozenset({"object", "int64", "float64"})
_SCALARS = (type(None), bool, int, float, str)
_OBJECT = np.dtype(object)


def _plain_dtype(dt: Any, objects: bool = False) -> bool:
    """A NumPy integer or float dtype (or, with ``objects``, the object dtype) exactly as NumPy makes it.

    A pickle can give a dtype any state, e.g. the flags that make NumPy treat
    int64 data as object pointers; only the flags, sizes and fields NumPy
    itself gives these dtypes are accepted.
    """
    if not isinstance(dt, np.dtype) or dt.names is not None or dt.subdtype is not None or dt.metadata is not None:
        return False
    if dt.kind == "O":
        return objects and dt.flags == _OBJECT.flags and dt.itemsize == _OBJECT.itemsize
    return dt.kind in "iuf" and dt.flags == 0 and not dt.hasobject and dt.itemsize in (1, 2, 4, 8)


class _DataFrameRules:
    """The exact pandas / NumPy globals a DataFrame of ids needs, and a check of every call made with them.

    Each global is admitted as a (module, name) pair, never a whole module.
    Those that a pickle calls (REDUCE) map to a check of the arguments;
    classes are instantiated only empty (NEWOBJ, ``copyreg._reconstructor``)
    and filled by BUILD, whose target and state are checked; the rest
    (``Index``, ``ndarray``, ``object``) are admitted only as arguments.
    """

    def __init__(self):
        import pandas  # noqa: F401  (ImportError handled by the caller)
        from pandas._libs.internals import _unpickle_block
        from pandas.core.frame import DataFrame
        from pandas.core.indexes.base import Index, _new_Index
        from pandas.core.indexes.range import RangeIndex
        from pandas.core.internals.blocks import Block
        from pandas.core.internals.managers import BlockManager

        self.DataFrame, self.BlockManager, self.Block = DataFrame, BlockManager, Block
        self.Index, self.RangeIndex = Index, RangeIndex
        self._new_Index, self._unpickle_block = _new_Index, _unpickle_block
        reconstruct = np.zeros(1).__reduce__()[0]
        scalar = np.float64(0).__reduce__()[0]
        frombuffer = np.zeros(1).__reduce_ex__(5)[0]
        self._reconstruct, self._scalar, self._frombuffer = reconstruct, scalar, frombuffer
        g: Dict[Tuple[str, str], Any] = {
            ("pandas.core.frame", "DataFrame"): DataFrame,
            ("pandas.core.internals.managers", "BlockManager"): BlockManager,
            ("pandas.core.internals", "BlockManager"): BlockManager,  # the name pandas < 0.24 wrote
            ("pandas._libs.internals", "_unpickle_block"): _unpickle_block,
            ("pandas.core.indexes.base", "_new_Index"): _new_Index,
            ("pandas.core.indexes.base", "Index"): Index,
            ("pandas.core.indexes.range", "RangeIndex"): RangeIndex,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        for core in ("numpy.core", "numpy._core"):  # NumPy 2 renamed numpy.core to numpy._core
            g[(f"{core}.multiarray", "_reconstruct")] = reconstruct
            g[(f"{core}.multiarray", "scalar")] = scalar
            g[(f"{core}.numeric", "_frombuffer")] = frombuffer
        for b in ("builtins", "__builtin__"):  # __builtin__, copy_reg: protocols 0-2 name them so
            g[(b, "slice")] = slice
            g[(b, "object")] = object
        g[("_codecs", "encode")] = codecs.encode  # protocols 0-2 write bytes as _codecs.encode(str, "latin1")
        for m in ("copyreg", "copy_reg"):
            g[(m, "_reconstructor")] = copyreg._reconstructor
        self.globals = g
        self.calls: Dict[int, Tuple[Any, Callable[[tuple], Any]]] = {
            id(reconstruct): (reconstruct, self._call_reconstruct),
            id(scalar): (scalar, self._call_scalar),
            id(frombuffer): (frombuffer, self._call_frombuffer),
            id(np.dtype): (np.dtype, self._call_dtype),
            id(slice): (slice, self._call_slice),
            id(codecs.encode): (codecs.encode, self._call_encode),
            id(copyreg._reconstructor): (copyreg._reconstructor, self._call_reconstructor),
            id(_new_Index): (_new_Index, self._call_new_index),
            id(_unpickle_block): (_unpickle_block, self._call_unpickle_block),
            id(BlockManager): (BlockManager, self._call_block_manager),
        }

    # -- calls (REDUCE) --

    @staticmethod
    def _args(args: tuple, n: Sequence[int], what: str) -> tuple:
        if type(args) is not tuple or len(args) not in n:
            raise _Refused(f"{what} called with unexpected arguments")
        return args

    def _call_reconstruct(self, args):
        a = self._args(args, (3,), "numpy _reconstruct")
        if not (a[0] is np.ndarray and type(a[1]) is tuple and a[1] == (0,) and type(a[2]) is bytes
                and a[2] == b"b"):
            raise _Refused("numpy _reconstruct called with unexpected arguments (only an empty ndarray is built)")
        return self._reconstruct(np.ndarray, (0,), b"b")

    def _call_dtype(self, args):
        a = self._args(args, (3,), "numpy.dtype")
        if type(a[0]) is not str or a[0] not in _DTYPE_CODES:
            raise _Refused(f"numpy.dtype({a[0]!r}) is not an integer, float or object dtype")
        if type(a[1]) not in (bool, int) or type(a[2]) not in (bool, int) or a[1] != 0 or a[2] != 1:
            # copy=True: the pickle then fills a fresh dtype, never NumPy's shared one
            raise _Refused("numpy.dtype called without copy=True")
        return np.dtype(a[0], False, True)

    def _call_frombuffer(self, args):
        a = self._args(args, (4,), "numpy _frombuffer")
        buf, dtype, shape, order = a
        if type(buf) not in (bytes, bytearray) or not _plain_dtype(dtype) or type(shape) is not tuple or \
                not all(type(s) is int and s >= 0 for s in shape) or order not in ("C", "F"):
            raise _Refused("numpy _frombuffer called with unexpected arguments (only number arrays are read)")
        return self._frombuffer(buf, dtype, shape, order)

    def _call_scalar(self, args):
        a = self._args(args, (2,), "numpy scalar")
        if not _plain_dtype(a[0]) or type(a[1]) is not bytes:
            raise _Refused("numpy scalar called with unexpected arguments (only integer and float scalars)")
        return self._scalar(a[0], a[1])

    def _call_slice(self, args):
        a = self._args(args, (1, 2, 3), "slice")
        if not all(v is None or type(v) is int for v in a):
            raise _Refused("slice called with arguments that are not ints")
        return slice(*a)

    def _call_encode(self, args):
        a = self._args(args, (2,), "_codecs.encode")
        if type(a[0]) is not str or a[1] != "latin1":
            raise _Refused("_codecs.encode called with unexpected arguments")
        return a[0].encode("latin1")

    def _call_reconstructor(self, args):
        a = self._args(args, (3,), "copyreg._reconstructor")
        if a[0] not in (self.DataFrame, self.BlockManager) or a[1] is not object or a[2] is not None:
            raise _Refused("copyreg._reconstructor called with unexpected arguments")
        return object.__new__(a[0])

    def _index_arg(self, d):
        if type(d) is not dict or not set(d) <= {"data", "name", "dtype", "start", "stop", "step"}:
            raise _Refused("an index is described by unexpected fields")
        for k, v in d.items():
            ok = (type(v) is np.ndarray if k == "data" else
                  ((type(v) is str and v in _INDEX_DTYPES) or _plain_dtype(v, objects=True)) if k == "dtype" else
                  (v is None or type(v) in (str, int)) if k == "name" else type(v) is int)
            if not ok:
                raise _Refused(f"an index field {k!r} holds {_kind(v)}")
        return d

    def _call_new_index(self, args):
        a = self._args(args, (2,), "pandas _new_Index")
        if a[0] is not self.Index and a[0] is not self.RangeIndex:
            raise _Refused(f"pandas _new_Index asked to build {_kind(a[0])} (only Index and RangeIndex)")
        d = self._index_arg(a[1])
        if a[0] is self.Index and "data" not in d:
            raise _Refused("pandas _new_Index called without index data")
        return self._new_Index(a[0], dict(d))

    def _placement(self, p) -> bool:
        return type(p) is slice or (type(p) is np.ndarray and p.dtype.kind in "iu" and p.ndim == 1)

    def _call_unpickle_block(self, args):
        a = self._args(args, (3,), "pandas _unpickle_block")
        if type(a[0]) is not np.ndarray or not self._placement(a[1]) or type(a[2]) is not int or a[2] not in (1, 2):
            raise _Refused("pandas _unpickle_block called with unexpected arguments (only NumPy blocks)")
        return self._unpickle_block(*a)

    def _is_index(self, x) -> bool:
        return type(x) is self.Index or type(x) is self.RangeIndex

    def _call_block_manager(self, args):
        a = self._args(args, (2, 3), "pandas BlockManager")
        blocks, axes = a[0], a[1]
        if type(blocks) not in (tuple, list) or not all(isinstance(b, self.Block) for b in blocks) or \
                type(axes) is not list or not all(self._is_index(x) for x in axes) or \
                (len(a) == 3 and type(a[2]) is not bool):
            raise _Refused("pandas BlockManager called with unexpected arguments")
        return self.BlockManager(tuple(blocks), axes)  # verify_integrity: the shapes are checked

    # -- instances --

    def new(self, cls, args):
        if (cls is not self.DataFrame and cls is not self.BlockManager) or type(args) is not tuple or args:
            raise _Refused(f"the pickle creates {_kind(cls)} (only an empty DataFrame or BlockManager)")
        return cls.__new__(cls)

    @staticmethod
    def check_object_items(items: list) -> None:
        """Python objects inside an object array: column names (str) and lists of ids only."""
        types = set(map(type, items))
        if not types <= {str, list}:
            bad = next(x for x in items if type(x) not in (str, list))
            raise _Refused(f"an object array holds {_kind(bad)} (only strings and lists of ids are accepted)")
        if list in types:
            inner = set(map(type, itertools.chain.from_iterable(x for x in items if type(x) is list)))
            if not inner <= _ID_TYPES:
                bad = next(t for t in inner if t not in _ID_TYPES)
                raise _Refused(f"a list in an object array holds a {bad.__module__}.{bad.__qualname__} (only numbers "
                               "are accepted as ids)")

    def check_build(self, inst, state) -> None:
        t = type(inst)
        if t is np.ndarray:
            if type(state) is not tuple or len(state) != 5 or type(state[1]) is not tuple or \
                    not isinstance(state[2], np.dtype):
                raise _Refused("an ndarray is given an unexpected state")
            dtype, data = state[2], state[4]
            if not _plain_dtype(dtype, objects=True):
                raise _Refused(f"an ndarray of dtype {dtype} (only plain number and object dtypes)")
            if dtype.kind == "O":
                if type(data) is not list:
                    raise _Refused(f"an object array is given {_kind(data)}")
                self.check_object_items(data)
            elif type(data) not in (bytes, bytearray):
                raise _Refused(f"an ndarray of dtype {dtype} is given {_kind(data)}")
            return
        if isinstance(inst, np.dtype):
            # Only the state NumPy itself gives this dtype, up to its byte order.
            own = inst.__reduce__()[2]
            if not _plain_dtype(inst, objects=True) or type(state) is not tuple or len(state) != len(own) or \
                    any(type(a) is not type(b) or a != b for i, (a, b) in enumerate(zip(state, own)) if i != 1) or \
                    state[1] not in (("|",) if inst.kind == "O" or inst.itemsize == 1 else ("<", ">", "=")):
                raise _Refused("a dtype is given a state other than its own (only plain number and object dtypes)")
            return
        if t is self.DataFrame:
            if type(state) is self.BlockManager:
                return
            allowed = {"_mgr", "_data", "_typ", "_metadata", "attrs", "_attrs", "_flags"}
            if type(state) is not dict or not set(state) <= allowed:
                extra = sorted(map(str, set(state) - allowed)) if type(state) is dict else [_kind(state)]
                raise _Refused(f"a DataFrame is given an unexpected state ({', '.join(extra)})")
            mgr = state.get("_mgr", state.get("_data"))
            if type(mgr) is not self.BlockManager or state.get("_typ") != "dataframe":
                raise _Refused("a DataFrame is given a state without its BlockManager")
            meta = state.get("_metadata", [])
            if type(meta) is not list or not all(type(m) is str for m in meta):
                raise _Refused("a DataFrame is given unexpected _metadata")
            for k in ("attrs", "_attrs", "_flags"):
                v = state.get(k, {})
                if v is not None and (type(v) is not dict or not all(type(x) in _SCALARS for x in v.values())):
                    raise _Refused(f"a DataFrame is given unexpected {k}")
            if set(state.get("_flags") or {}) - {"allows_duplicate_labels"}:
                raise _Refused("a DataFrame is given unexpected flags")
            return
        if t is self.BlockManager:  # pandas < 1.x layout: (axes, values, items, {"0.14.1": {...}})
            ok = type(state) is tuple and len(state) == 4 and type(state[3]) is dict and set(state[3]) == {"0.14.1"}
            inner = state[3]["0.14.1"] if ok else None
            ok = ok and type(inner) is dict and set(inner) == {"axes", "blocks"} and type(inner["axes"]) is list \
                and all(self._is_index(x) for x in inner["axes"]) and type(inner["blocks"]) is list
            ok = ok and all(type(b) is dict and set(b) == {"values", "mgr_locs"} and type(b["values"]) is np.ndarray
                            and self._placement(b["mgr_locs"]) for b in inner["blocks"])
            if not ok:
                raise _Refused("a BlockManager is given an unexpected state")
            return
        raise _Refused(f"the pickle sets the state of {_kind(inst)}")


class _DataFrameUnpickler(pickle._Unpickler):  # the Python implementation: every opcode that calls code is checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, rules: _DataFrameRules, budget: _Budget):
        super().__init__(file)
        self._rules = rules
        self._budget = budget

    def find_class(self, module, name):
        obj = self._rules.globals.get((module, name))
        if obj is None:
            raise _Refused(f"the pickle asks for {module}.{name}, which is not among the pandas and NumPy "
                           "classes a DataFrame of item ids needs")
        return obj

    def persistent_load(self, pid):
        raise _Refused("the pickle refers to a persistent object")

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        entry = self._rules.calls.get(id(func))
        if entry is None or entry[0] is not func:
            raise _Refused(f"the pickle calls {_kind(func)}")
        stack[-1] = entry[1](args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._rules.new(cls, args))

    def load_refused(self):
        raise _Refused("the pickle instantiates a class with arguments (INST / OBJ / NEWOBJ_EX)")

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if type(inst) is np.ndarray and type(state) is tuple and len(state) == 5:
            shape, data = state[1], state[4]
            if type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape):
                self._budget.spend(math.prod(shape))
            if type(data) is list:
                # The cells of an object array (the seq lists) are checked next and read item by item
                # later: counted with repetition, and copied, so that a list the pickle still holds a
                # reference to cannot be filled after its check.
                kinds = set(map(type, data))
                if kinds == {list}:
                    cells = list(map(list.copy, data))
                    self._budget.spend(sum(map(len, cells)))
                    self.stack[-1] = state = state[:4] + (cells,)
                elif list in kinds:
                    self._budget.spend(sum(len(c) for c in data if type(c) is list))
                    self.stack[-1] = state = state[:4] + ([list(c) if type(c) is list else c for c in data],)
        self._rules.check_build(inst, state)
        super().load_build()

    # Memo gets: a reference to an earlier object costs its size (see PICKLE_ELEMENTS_PER_BYTE).
    def load_get(self):
        super().load_get()
        self._budget.spend(_weight(self.stack[-1]))

    def load_binget(self):
        super().load_binget()
        self._budget.spend(_weight(self.stack[-1]))

    def load_long_binget(self):
        super().load_long_binget()
        self._budget.spend(_weight(self.stack[-1]))

    # Containers built from the items above a mark: their items count.
    def load_tuple(self):
        super().load_tuple()
        self._budget.spend(len(self.stack[-1]) + 1)

    def load_list(self):
        super().load_list()
        self._budget.spend(len(self.stack[-1]) + 1)

    def load_dict(self):
        super().load_dict()
        self._budget.spend(len(self.stack[-1]) + 1)

    def load_frozenset(self):
        super().load_frozenset()
        self._budget.spend(len(self.stack[-1]) + 1)

    def _target(self, index: int, kind: type, what: str):
        target = self.stack[index]
        if type(target) is not kind:
            raise _Refused(f"the pickle {what} {_kind(target)}")
        return target

    def load_setitem(self):
        self._target(-3, dict, "sets items of")
        super().load_setitem()

    def load_setitems(self):
        items = self.pop_mark()
        self._budget.spend(len(items) // 2)
        d = self._target(-1, dict, "sets items of")
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    def load_append(self):
        self._target(-2, list, "appends to")
        super().load_append()

    def load_appends(self):
        items = self.pop_mark()
        self._budget.spend(len(items))
        self._target(-1, list, "appends to").extend(items)

    def load_additems(self):
        items = self.pop_mark()
        self._budget.spend(len(items))
        self._target(-1, set, "adds items to").update(items)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_refused
    dispatch[pickle.INST[0]] = load_refused
    dispatch[pickle.OBJ[0]] = load_refused
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.GET[0]] = load_get
    dispatch[pickle.BINGET[0]] = load_binget
    dispatch[pickle.LONG_BINGET[0]] = load_long_binget
    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension


def _read_bytes(path: str, empty_ok: bool = False) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES (FileNotFoundError, DataFormatError); an
    empty file is refused unless ``empty_ok``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    _regular_file(path)  # a device or FIFO would be read forever; a huge file is refused unread
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:  # grew after the check
        raise DataFormatError(path, None, f"the file holds more than {_bytes(MAX_FILE_BYTES)} "
                                          "(refit.data.formats.MAX_FILE_BYTES)")
    if not raw and not empty_ok:
        raise DataFormatError(path, None, "the file is empty (0 bytes)")
    return raw


def read_plain_pickle(path: str) -> Any:
    """Unpickles a file that may hold only dicts, lists and ints (and the strings, floats, tuples that
    pickle's own opcodes make); any class or function raises DataFormatError and nothing runs."""
    raw = _read_bytes(path)
    reader = _PlainPyUnpickler if copyreg._extension_registry else _PlainUnpickler
    budget = _Budget(len(raw))
    try:
        obj = reader(io.BytesIO(raw), budget).load()
        _count_plain(obj, budget)
        log.debug("%s: %d elements of at most %d", path, budget.used, budget.limit)
        return obj
    except _Refused as exc:
        raise DataFormatError(path, None, f"refused to unpickle: {exc}; nothing in the file was run") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways, each gets the same sentence
        raise DataFormatError(path, None, f"not a readable pickle ({type(exc).__name__}: {exc})") from None


_RULES: Optional[_DataFrameRules] = None


def read_dataframe(path: str):
    """Unpickles a pandas DataFrame of numbers and lists of ids (a DreamRec ``.df`` file) with the
    restricted unpickler described in the module docstring.

    Raises:
        ImportError saying to install pandas when it is missing;
        DataFormatError naming the file for anything else than such a DataFrame.
    """
    global _RULES
    raw = _read_bytes(path)
    if _RULES is None:
        try:
            _RULES = _DataFrameRules()
        except ImportError as exc:
            raise ImportError(f"{path}: {PANDAS_HINT} ({exc})") from None
    budget = _Budget(len(raw))
    try:
        obj = _DataFrameUnpickler(io.BytesIO(raw), _RULES, budget).load()
        log.debug("%s: %d elements of at most %d", path, budget.used, budget.limit)
    except _Refused as exc:
        raise DataFormatError(path, None, f"refused to unpickle: {exc}; nothing in the file was run") from None
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(path, None, f"not a readable pandas DataFrame pickle ({type(exc).__name__}: "
                                          f"{exc})") from None
    if type(obj) is not _RULES.DataFrame:
        raise DataFormatError(path, None, f"expected a pandas DataFrame, got {_kind(obj)}")
    try:  # a DataFrame (or its BlockManager) the pickle never gave a state has no columns or rows
        columns = list(obj.columns)
        len(obj)
    except Exception as exc:  # noqa: BLE001
        raise DataFormatError(path, None, f"the pickle holds an incomplete DataFrame ({type(exc).__name__}: "
                                          f"{exc})") from None
    # Columns are looked up by name: a repeated name would give a DataFrame where a column is expected.
    seen = set()
    for c in columns:
        if type(c) is not str and not isinstance(c, (int, np.integer)):
            raise DataFormatError(path, None, f"a column name is {_kind(c)} (column names are strings)")
        if c in seen:
            raise DataFormatError(path, None, f"the column {c!r} appears more than once (column names must be "
                                              "unique)")
        seen.add(c)
    return obj


# --- RecBole's pickles, read and written without RecBole ---------------------------------------


_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "object", "tuple",
                  "list", "dict", "int", "float", "bool", "str"}


def _load_storage_bytes(b: bytes) -> Any:
    """Stands in for ``torch.storage._load_from_bytes``, which unpickles its bytes with plain pickle.

    RecBole's saved dataloaders are plain pickles whose tensors keep their
    storage as nested ``torch.save`` bytes; those hold storages only, which
    the weights-only loader reads.
    """
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _real_globals() -> Dict[Tuple[str, str], Any]:
    """The globals rebuilt for real, by exact module and name; every other one becomes an Opaque stand-in.

    Whole modules are never admitted: ``torch`` or ``numpy`` also hold
    functions that run code or read other pickles (``torch.load``,
    ``numpy.load``, ``os`` reached as ``torch.serialization.os``).
    """
    real: Dict[Tuple[str, str], Any] = {}
    try:  # torch's own list of what tensors, storages and dtypes need (what torch.load(weights_only=True) admits)
        from torch._weights_only_unpickler import _get_allowed_globals

        table = dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without it: the tensor rebuilders RecBole's files use
        table = {f"torch._utils.{n}": getattr(torch._utils, n)
                 for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                           "_rebuild_parameter_with_state") if hasattr(torch._utils, n)}
        table.update({"torch.device": torch.device, "torch.Size": torch.Size,
                      "collections.OrderedDict": collections.OrderedDict, "_codecs.encode": codecs.encode})
    for full, obj in table.items():
        module, _, name = full.rpartition(".")
        real[(module, name)] = obj
    real[("torch.storage", "_load_from_bytes")] = _load_storage_bytes
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5's form of an array (refuses object dtypes)
    for core in ("numpy.core", "numpy._core"):  # NumPy 2 renamed numpy.core to numpy._core
        real[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        real[(f"{core}.multiarray", "scalar")] = scalar
        real[(f"{core}.numeric", "_frombuffer")] = frombuffer
    real[("numpy", "ndarray")] = np.ndarray
    real[("numpy", "dtype")] = np.dtype
    for name in ("OrderedDict", "defaultdict", "Counter", "deque"):
        real[("collections", name)] = getattr(collections, name)
    for name in ("_reconstructor", "__newobj__", "__newobj_ex__"):
        real[("copyreg", name)] = getattr(copyreg, name)
    for name in ("date", "datetime", "time", "timedelta", "timezone"):
        real[("datetime", name)] = getattr(datetime, name)
    for name in _SAFE_BUILTINS:
        real[("builtins", name)] = getattr(builtins, name)
    real[("__builtin__", "set")] = set  # protocol 2 pickles written by Python 2
    return real


class Opaque:
    """Stand-in for an object of a class that is not imported (RecBole's Config, enums, data sets...).

    Keeps what the pickle said about the object (constructor arguments,
    state, list and dict items) so that it can be read (``obj.state``,
    attribute access to entries of a dict state) and pickled again as the
    original class.
    """

    _origin: Tuple[str, str] = ("", "")

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        # Reached only when the pickle called the class (REDUCE), not for NEWOBJ.
        self.__dict__["_called"] = True

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def append(self, item):
        self.__dict__.setdefault("_listitems", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_listitems", []).extend(items)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_dictitems", []).append((key, value))

    @property
    def state(self):
        return self.__dict__.get("_state")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        state = self.__dict__.get("_state")
        if isinstance(state, dict) and name in state:
            return state[name]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and name in state[1]:
            return state[1][name]
        raise AttributeError(f"{self._origin[0]}.{self._origin[1]} stand-in has no {name!r}")

    def __reduce_ex__(self, protocol):
        cls, d = type(self), self.__dict__
        args, state = d.get("_args", ()), d.get("_state")
        items = iter(d["_listitems"]) if d.get("_listitems") else None
        ditems = iter(d["_dictitems"]) if d.get("_dictitems") else None
        if d.get("_called", False):
            return (cls, args, state, items, ditems)
        return (copyreg.__newobj__, (cls,) + tuple(args), state, items, ditems)

    def __repr__(self):
        return f"<{self._origin[0]}.{self._origin[1]} (not imported)>"


_OPAQUE_CLASSES: Dict[Tuple[str, str], type] = {}


def _opaque_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _OPAQUE_CLASSES:
        _OPAQUE_CLASSES[key] = type(name.split(".")[-1], (Opaque,), {"_origin": key, "__module__": __name__})
    return _OPAQUE_CLASSES[key]


_REAL_GLOBALS = _real_globals()


class _Unpickler(pickle._Unpickler):  # the Python implementation: its BUILD can be checked
    """Builds tensors, arrays and containers; everything else becomes an :class:`Opaque` (never imported).

    Nothing is imported and no global is looked up by name: :data:`_REAL_GLOBALS`
    maps exact (module, name) pairs to objects. A pickle may not set
    attributes on a class, function or module (BUILD on such an object),
    which would change them for the whole process.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        real = _REAL_GLOBALS.get((module, name))
        return real if real is not None else _opaque_class(module, name)

    def load_build(self):
        target = self.stack[-2]
        if isinstance(target, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                               types.ModuleType)):
            raise pickle.UnpicklingError(f"the pickle sets attributes of {target!r}, which refit does not allow")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


class _Pickler(pickle._Pickler):  # the Python implementation: its save_global can be extended
    """Writes :class:`Opaque` classes back under their original module and name."""

    def save_global(self, obj, name=None):
        origin = getattr(obj, "_origin", None) if isinstance(obj, type) and issubclass(obj, Opaque) else None
        if origin is None:
            return super().save_global(obj, name)
        module, qualname = origin
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        self.memoize(obj)


#: The pickle module torch.load and torch.save take for RecBole files (``pickle_module=``).
RECBOLE_PICKLE_MODULE = types.ModuleType("refit_recbole_pickle")
RECBOLE_PICKLE_MODULE.Unpickler = _Unpickler
RECBOLE_PICKLE_MODULE.Pickler = _Pickler
RECBOLE_PICKLE_MODULE.load = lambda f, **kw: _Unpickler(f, **kw).load()
RECBOLE_PICKLE_MODULE.loads = lambda b, **kw: _Unpickler(io.BytesIO(b), **kw).load()
RECBOLE_PICKLE_MODULE.dump = lambda obj, f, protocol=None, **kw: _Pickler(f, protocol, **kw).dump(obj)
RECBOLE_PICKLE_MODULE.__version__ = pickle.format_version


def read_pickle(path: str) -> Any:
    """Reads a RecBole file (``torch.save`` or plain pickle) without importing RecBole.

    Either way the pickle goes through :class:`_Unpickler`: RecBole's classes
    become :class:`Opaque` stand-ins and nothing in the file runs code.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        if not is_zip:  # RecBole pickles its dataloaders plainly; torch's older format opens with a magic number
            with open(path, "rb") as f:
                first = _Unpickler(f).load()
            if not (type(first) is int and first == torch.serialization.MAGIC_NUMBER):
                return first
        # weights_only=False only lets torch use this module's restricted unpickler (pickle_module).
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RECBOLE_PICKLE_MODULE)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same sentence
        raise ValueError(f"{path!r} could not be read as a RecBole file ({type(exc).__name__}: {exc})") from exc
