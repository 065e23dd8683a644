"""The wire format of an encoded update: its ``ArrayRecord`` layout, and its validation on the server.

An encoded reply keeps the one ``ArrayRecord`` ``arrays`` every train reply carries; each
tensor ``name`` of the plain reply becomes one Array per part of its codec, keyed
``name + SEP + part`` (``layer.weight::values``, ``layer.weight::scales``; parts and dtypes in
:mod:`pwff_app.compression.codecs`), each 1-D. The codec itself is not on the wire: the server
chose it for the client and round (``pwff.codec`` in the train message's config) and expects
exactly that layout. Payload bytes (:mod:`pwff_app.federation.payload`) are the parts' numel x
itemsize: what the link and the ``comm`` numbers count is the encoded form.

:func:`decode_record` is the server's check and decoder in one: a client's encoding is input
from outside, so keys, dtypes and sizes must be exactly the layout's, the bytes must decode to
what the Arrays declare, scales and values must be finite (scales >= 0), top-k indices
strictly increasing in [0, numel). Anything else is one line of reason, and the reply is
rejected like any other bad reply (:mod:`pwff_app.federation.checks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from pwff_app.compression.codecs import Codec
from pwff_app.federation.checks import decode_problem

SEP = "::"


def encode_record(update: Mapping[str, np.ndarray], codec: Codec) -> ArrayRecord:
    """The ``ArrayRecord`` that carries ``update`` (name -> tensor) encoded with ``codec``."""
    record = ArrayRecord()
    for name in sorted(update):
        for part, value in codec.encode(update[name]).items():
            record[name + SEP + part] = Array(np.ascontiguousarray(value))
    return record


def decode_record(record: ArrayRecord, reference: Mapping[str, np.ndarray],
                  codec: Codec) -> dict[str, np.ndarray] | str:
    """The decoded update (name -> float32 tensor shaped like ``reference[name]``), or why not.

    ``reference`` names the tensors and their shapes (the global the server sent, or its packed
    sparse form in the instruct family).
    """
    expected = {name + SEP + part: (dtype, length) for name, ref in reference.items()
                for part, (dtype, length) in codec.layout(int(np.prod(ref.shape))).items()}
    got = set(record.keys())
    if got != set(expected):
        extra, missing = sorted(got - set(expected)), sorted(set(expected) - got)
        return f"{codec} encoding: keys differ from its layout (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, (dtype, length) in expected.items():
        arr = record[key]
        if arr.dtype != dtype or tuple(arr.shape) != (length,):
            return f"{codec} encoding: {key} is {arr.dtype}{list(arr.shape)}, expected {dtype}[{length}]"
    problem = decode_problem(record)  # truncated or foreign bytes
    if problem is not None:
        return f"{codec} encoding: {problem}"
    out = {}
    for name, ref in reference.items():
        numel = int(np.prod(ref.shape))
        parts = {part: record[name + SEP + part].numpy() for part in codec.layout(numel)}
        problem = _parts_problem(parts, numel, codec)
        if problem is not None:
            return f"{codec} encoding: {name}: {problem}"
        out[name] = codec.decode(parts, numel).reshape(ref.shape)
    return out


def _parts_problem(parts: Mapping[str, np.ndarray], numel: int, codec: Codec) -> str | None:
    """Why decoded parts of one tensor are unusable (non-finite, negative scale, bad index), or None."""
    scales = parts.get("scales")
    if scales is not None and not (np.isfinite(scales).all() and (scales >= 0).all()):
        return "a scale is not a finite number >= 0"
    values = parts["values"]
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return "non-finite values"
    if codec.name == "bf16" and ((values & 0x7F80) == 0x7F80).any():  # exponent all ones: inf / NaN
        return "non-finite values"
    indices = parts.get("indices")
    if indices is not None and indices.size:
        if indices.min() < 0 or indices.max() >= numel:
            return f"an index is outside [0, {numel})"
        if (np.diff(indices.astype(np.int64)) <= 0).any():
            return "indices are not strictly increasing (repeated or unsorted)"
    return None


def payload_bits(reference: Mapping[str, np.ndarray | tuple[int, ...]], codec: Codec) -> int:
    """Payload bits of an update shaped like ``reference`` (arrays or shapes) once encoded."""
    return sum(codec.encoded_bits(math.prod(np.shape(r) if isinstance(r, np.ndarray) else r))
               for r in reference.values())
