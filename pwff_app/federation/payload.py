"""Size of what a message carries on the air.

Payload is the tensor bytes of every array a message carries (numel x itemsize, as
transmitted: after any compression the compressed arrays count). Framing (the npy header
inside each ``Array.data``, record keys, protobuf overhead) is not payload; it is reported
apart as *framed* bytes so nobody has to guess which number a plot shows.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict


def array_payload_bytes(array: Array) -> int:
    """Tensor bytes of one Flower ``Array`` (numel x itemsize), in bytes."""
    return math.prod(array.shape) * np.dtype(array.dtype).itemsize


def arrayrecord_payload_bytes(record: ArrayRecord) -> int:
    """Tensor bytes of every array in one ``ArrayRecord``, in bytes."""
    return sum(array_payload_bytes(a) for a in record.values())


def payload_bytes(content: RecordDict) -> int:
    """Tensor bytes of every ``ArrayRecord`` in a message's content, in bytes."""
    return sum(arrayrecord_payload_bytes(r) for r in content.array_records.values())


def framed_bytes(content: RecordDict) -> int:
    """Serialized array bytes including per-array npy headers, in bytes."""
    return sum(len(a.data) for r in content.array_records.values() for a in r.values())
