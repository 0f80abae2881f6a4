"""The reference ``safetensors`` library as an oracle for our reader, and generators of hostile safetensors files.

Used by tests/test_safetensors_differential.py, tests/test_fuzz_safetensors.py and bench/fuzz_safetensors.py.
A file counts as accepted by the reference when ``safe_open`` opens it and ``get_tensor`` succeeds for every key.
"""
from __future__ import annotations

import json
import random
import signal
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from weightspace.errors import WeightspaceError
from weightspace.io.formats import SafetensorsReader

__all__ = ["reference_read", "our_read", "agree", "render", "Raw", "Obj", "file_bytes", "Timeout", "alarm", "mutate", "seed_files"]

DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
              "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def reference_read(path: Path) -> tuple[dict, dict] | None:
    """(tensors, metadata) as the reference reads them, or None when it refuses the file."""
    from safetensors import safe_open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, dict(meta)
    except Exception:  # noqa: BLE001 — any refusal counts (SafetensorError, TypeError from torch, ...)
        return None


def our_read(path: Path) -> tuple[dict, dict] | None:
    """(tensors, metadata) as weightspace reads them, or None when it refuses the file with a WeightspaceError.
    Any other exception propagates: that is a bug."""
    try:
        r = SafetensorsReader(path)
    except WeightspaceError:
        return None
    try:
        return {k: r.read(k) for k in r.tensors}, dict(r.metadata)
    except WeightspaceError:
        return None
    finally:
        r.close()


def agree(path: Path) -> bool:
    """Assert that we accept exactly when the reference does, and read what it reads; returns whether accepted."""
    ref = reference_read(path)
    ours = our_read(path)
    assert (ref is None) == (ours is None), (f"reference {'accepts' if ref is not None else 'refuses'}, we "
                                             f"{'accept' if ours is not None else 'refuse'}: {path.read_bytes()[:300]!r}")
    if ref is None:
        return False
    (rt, rm), (ot, om) = ref, ours
    assert rm == om
    assert sorted(rt) == sorted(ot)
    for k in rt:
        assert rt[k].dtype == ot[k].dtype and tuple(rt[k].shape) == tuple(ot[k].shape), (k, rt[k].dtype, ot[k].dtype,
                                                                                        rt[k].shape, ot[k].shape)
        assert torch.equal(_raw(rt[k]), _raw(ot[k])), k
    return True


class Raw(str):
    """A JSON token written as is (e.g. -0, 1e400, NaN, "\\ud800")."""


class Obj(list):
    """A JSON object as a list of (key, value) pairs: keys may repeat."""


def render(v, indent: str = "") -> str:
    """JSON text of a value built from Obj, list, Raw, str, int, float, bool and None."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + indent + ",".join(f"{render(k)}:{render(x)}" for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(render(x) for x in v) + "]"
    return json.dumps(v)


def file_bytes(header_text: str | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (``length`` overrides it), header, data."""
    raw = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(raw) if length is None else length % (1 << 64)) + raw + data


class Timeout(Exception):
    """A file took longer than the alarm allows."""


@contextmanager
def alarm(seconds: float):
    """Raise Timeout in this thread if the block runs longer than ``seconds`` (SIGALRM; no process per file)."""
    def fire(signum, frame):
        raise Timeout(f"took over {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def seed_files(folder: Path) -> list[bytes]:
    """Valid files written by the reference library: the seeds that mutations start from."""
    import safetensors.torch as st
    g = torch.Generator().manual_seed(0)
    sets = [
        {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        {"x": torch.arange(6, dtype=torch.int64).reshape(2, 3), "m": torch.tensor([True, False]),
         "h": torch.randn(5, generator=g).half(), "e": torch.zeros(0, 4)},
        {"c": torch.randn(2, generator=g).to(torch.complex64), "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
         "bf": torch.randn(3, generator=g).bfloat16(), "s": torch.tensor(1.5)},
    ]
    out = []
    for i, sd in enumerate(sets):
        p = folder / f"seed{i}.safetensors"
        st.save_file(sd, str(p), metadata={"format": "pt", "k": "v"} if i % 2 else None)
        out.append(p.read_bytes())
    return out


_WEIRD_NUMBERS = ["-0", "-1", "2.0", "true", "false", "null", '"3"', "1e2", "18446744073709551615",
                  "18446744073709551616", "9223372036854775808", "9223372036854775807", "1e400", "-1e400", "0.0",
                  "[]", "{}", "4294967296"]


def _mutate_header(header: Obj, rng: random.Random) -> Obj | str:
    """A structure-aware edit of a parsed header (as Obj pairs); returns the edited structure or raw JSON text."""
    try:
        return _edit(Obj(header), rng)
    except (KeyError, TypeError, ValueError, IndexError):  # an earlier edit removed what this one needs
        return header


def _edit(header: Obj, rng: random.Random) -> Obj | str:
    tensors = [(i, kv) for i, kv in enumerate(header) if kv[0] != "__metadata__" and isinstance(kv[1], Obj)]
    kind = rng.randrange(14)
    if tensors:
        i, (key, entry) = rng.choice(tensors)
        fields = dict(entry)
    if kind == 0 and tensors:  # a dimension becomes a weird number
        shape = list(fields["shape"]) or [1]
        shape[rng.randrange(len(shape))] = Raw(rng.choice(_WEIRD_NUMBERS))
        header[i] = (key, Obj([(k, shape if k == "shape" else v) for k, v in entry]))
    elif kind == 1 and tensors:  # an offset becomes a weird number or moves by a little
        offs = list(fields["data_offsets"])
        j = rng.randrange(2)
        offs[j] = Raw(rng.choice(_WEIRD_NUMBERS)) if rng.random() < 0.5 else max(0, offs[j] + rng.choice([-8, -1, 1, 8]))
        header[i] = (key, Obj([(k, offs if k == "data_offsets" else v) for k, v in entry]))
    elif kind == 2 and tensors:  # another dtype (known, unknown, or serde's object form)
        d = rng.choice(list(DTYPE_BITS) + ["F8", "f32", "", "X"])
        val = Obj([(d, None)]) if rng.random() < 0.2 else d
        header[i] = (key, Obj([(k, val if k == "dtype" else v) for k, v in entry]))
    elif kind == 3 and tensors:  # the array form of a tensor entry, or a wrong-length one
        arr = [fields["dtype"], fields["shape"], fields["data_offsets"]]
        header[i] = (key, arr[: rng.choice([3, 3, 2])] + ([1] if rng.random() < 0.2 else []))
    elif kind == 4 and tensors:  # an unknown field, sometimes with a value serde refuses
        val = Raw(rng.choice(["1", "NaN", '"\\ud800"', '"\\ud83d\\ude00"', "1e400", "12345678901234567890123",
                              "[" * 126 + "]" * 126, "[" * 127 + "]" * 127, "-0", "{}"]))
        header[i] = (key, Obj(list(entry) + [(rng.choice(["x", "dtypes", "DTYPE"]), val)]))
    elif kind == 5 and tensors:  # a repeated field, or a missing one
        f = rng.choice(list(entry))
        header[i] = (key, Obj(list(entry) + [f]) if rng.random() < 0.6 else Obj([kv for kv in entry if kv != f]))
    elif kind == 6 and tensors:  # a repeated key
        header.append((key, rng.choice([entry, Obj([("dtype", "XX")] + list(entry)[1:])])))
    elif kind == 7:  # metadata variants
        meta = rng.choice([None, Obj([("a", "b")]), Obj([("a", Raw("1"))]), Raw('"s"'), [], Obj([("a", "b"), ("a", "c")]),
                           Obj([("a", Raw('"\\udc00"'))]), Obj([("a", Raw("null"))])])
        header[:] = [kv for kv in header if kv[0] != "__metadata__"]
        header.insert(rng.randrange(len(header) + 1), ("__metadata__", meta))
        if rng.random() < 0.2:
            header.append(("__metadata__", Obj()))
    elif kind == 8 and tensors:  # a key with escapes
        header[i] = (Raw(rng.choice(['"a\\nb"', '"\\ud800"', '"\\ud83d\\ude00"', '""', '"\\u0000"', '"x\\"y"'])), entry)
    elif kind == 9 and tensors:  # shapes with huge dimensions beside a zero
        big = rng.choice([1 << 63, (1 << 63) - 1, (1 << 64) - 1, 1 << 32, 1 << 62])
        shape = rng.choice([[0, big], [big, 0], [big, big, 0], [0, big, 2]])
        header[i] = (key, Obj([(k, shape if k == "shape" else v) for k, v in entry]))
    elif kind == 10:  # text-level edits of the whole header
        text = render(header)
        how = rng.randrange(5)
        if how == 0:
            return " \t\n" + text + "  "
        if how == 1:
            return "\ufeff" + text
        if how == 2:
            return text + rng.choice(["x", "}", ",", "\x00"])
        if how == 3:
            return rng.choice(["[]", "null", '"x"', "1", "{}"])
        return text.replace(":", ": ", rng.randrange(1, 4))
    elif kind == 11 and len(tensors) >= 2:  # swap two tensors' offsets
        (i1, (k1, e1)), (i2, (k2, e2)) = rng.sample(tensors, 2)
        o1, o2 = dict(e1)["data_offsets"], dict(e2)["data_offsets"]
        header[i1] = (k1, Obj([(k, o2 if k == "data_offsets" else v) for k, v in e1]))
        header[i2] = (k2, Obj([(k, o1 if k == "data_offsets" else v) for k, v in e2]))
    elif kind == 12 and tensors:  # drop a tensor (its bytes stay)
        del header[i]
    elif kind == 13 and tensors:  # an empty shape or an F4 shape
        shape = rng.choice([[], [1], [3], [2, 1], [1, 2]])
        header[i] = (key, Obj([(k, shape if k == "shape" else ("F4" if k == "dtype" and rng.random() < 0.5 else v))
                              for k, v in entry]))
    return header


def mutate(seed: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a valid file: byte flips, truncation, header-length values or structure-aware edits."""
    kind = rng.randrange(4)
    data = bytearray(seed)
    (n,) = struct.unpack("<Q", seed[:8])
    if kind == 0:  # flip bytes, mostly in the header
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(8, 8 + n) if rng.random() < 0.8 else rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 1:  # truncate or extend
        if rng.random() < 0.7:
            return bytes(data[: rng.randrange(len(data))])
        return bytes(data) + bytes(rng.randint(1, 9))
    if kind == 2:  # header-length field
        value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(data), len(data) - 8, 100_000_000, 100_000_001,
                            (1 << 63), (1 << 64) - 1, rng.randrange(1 << 64)])
        return struct.pack("<Q", value % (1 << 64)) + bytes(data[8:])
    header = json.loads(seed[8:8 + n], object_pairs_hook=lambda pairs: Obj(pairs))
    body = seed[8 + n:]
    for _ in range(rng.randint(1, 2)):
        header = _mutate_header(header, rng) if isinstance(header, Obj) else header
    text = header if isinstance(header, str) else render(header)
    return file_bytes(text, body)
