"""Update codecs for the uplink (and the casts for the downlink): pure encode / decode, sizes, bounds.

Pure numpy, no Flower. A codec turns one float32 tensor (flattened) into named *parts* (numpy
arrays: what travels) and back. Every lossy codec is applied to the *update* (the reply minus
the global the client received; :mod:`pwff_app.compression.mod`), never to the weights.

| codec | parts (n = numel, B = block size, k = round(f n) >= 1) | payload bits per element | bound on abs error per element |
|---|---|---|---|
| ``none`` | the tensor itself | 32 | 0 |
| ``fp16`` | ``values`` float16 [n] | 16 | 2^-11 \\|x\\| (normal range; overflow is refused) |
| ``bf16`` | ``values`` uint16 [n] (bfloat16 bits) | 16 | 2^-8 \\|x\\| |
| ``int8`` | ``values`` int8 [n], ``scales`` float32 [ceil(n/B)] | 8 + 32/B | scale/2 = max\\|block\\| / 254 |
| ``int4`` | ``values`` uint8 [ceil(n/2)] (two nibbles, offset 8), ``scales`` float32 [ceil(n/B)] | 4 + 32/B | scale/2 = max\\|block\\| / 14 |
| ``topk:f`` | ``indices`` int32 [k] (sorted), ``values`` float32 [k] | 64 f | 0 on the k largest \\|x\\|, \\|x\\| elsewhere |

int8 / int4 are symmetric per-block quantizers (scale = max|x| of the block / 127 or / 7,
zero point 0, round half to even), written here with numpy: torch's own quantize ops
(``torch.quantize_per_channel``) are deprecated as of torch 2.13 and have no per-channel
4-bit kernel, and bitsandbytes is not a dependency. ``B = 0`` means one scale per tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

CODEC_NAMES = ("none", "fp16", "bf16", "int8", "int4", "topk")
_TOPK = re.compile(r"^topk:(\d*\.?\d+(?:[eE]-?\d+)?)$")
_LEVELS = {"int8": 127, "int4": 7}  # largest integer magnitude of the symmetric grid


class CodecError(ValueError):
    """A codec name that is not one of :data:`CODEC_NAMES` (``topk:<fraction in (0, 1)>``)."""


@dataclass(frozen=True)
class Codec:
    """One codec: ``name`` (an entry of :data:`CODEC_NAMES`), ``fraction`` (top-k share of
    entries sent), ``block_size`` (int8 / int4: elements per scale; 0 = one scale per tensor)."""

    name: str
    fraction: float = 1.0
    block_size: int = 0

    @property
    def lossy(self) -> bool:
        return self.name != "none"

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.name == "topk" else self.name

    # -- sizes ----------------------------------------------------------------

    def blocks(self, numel: int) -> int:
        """Number of scales of an int8 / int4 tensor of ``numel`` elements."""
        return 1 if self.block_size <= 0 else max(1, math.ceil(numel / self.block_size))

    def kept(self, numel: int) -> int:
        """Entries top-k sends of a tensor of ``numel`` elements: round(f n), at least 1 (0 if empty)."""
        return min(numel, max(1, round(self.fraction * numel))) if numel else 0

    def layout(self, numel: int) -> dict[str, tuple[str, int]]:
        """part -> (numpy dtype name, length) of one encoded tensor of ``numel`` elements."""
        if self.name == "none":
            return {"values": ("float32", numel)}
        if self.name == "fp16":
            return {"values": ("float16", numel)}
        if self.name == "bf16":
            return {"values": ("uint16", numel)}
        if self.name == "int8":
            return {"values": ("int8", numel), "scales": ("float32", self.blocks(numel))}
        if self.name == "int4":
            return {"values": ("uint8", (numel + 1) // 2), "scales": ("float32", self.blocks(numel))}
        return {"indices": ("int32", self.kept(numel)), "values": ("float32", self.kept(numel))}

    def encoded_bits(self, numel: int) -> int:
        """Payload bits of one encoded tensor of ``numel`` elements (sum of numel x itemsize x 8 of its parts)."""
        return sum(8 * n * np.dtype(dtype).itemsize for dtype, n in self.layout(numel).values())

    # -- encode / decode --------------------------------------------------------

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The parts of ``x`` (any shape, read as flat float32)."""
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if self.name == "none":
            return {"values": flat}
        if self.name == "fp16":
            if np.abs(flat).max(initial=0.0) > np.finfo(np.float16).max:
                raise OverflowError("fp16: an update entry exceeds 65504")
            return {"values": flat.astype(np.float16)}
        if self.name == "bf16":
            bits = flat.view(np.uint32)
            # round to nearest even on the upper 16 bits (what torch's bfloat16 cast does)
            rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return {"values": (rounded >> np.uint32(16)).astype(np.uint16)}
        if self.name in _LEVELS:
            return self._quantize(flat)
        k = self.kept(flat.size)
        top = np.argpartition(-np.abs(flat), k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        indices = np.sort(top).astype(np.int32)
        return {"indices": indices, "values": flat[indices]}

    def _quantize(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        levels, n = _LEVELS[self.name], flat.size
        size = n if self.block_size <= 0 else self.block_size
        padded = np.zeros(self.blocks(n) * max(size, 1), dtype=np.float32)
        padded[:n] = flat
        blocks = padded.reshape(self.blocks(n), -1)
        scales = (np.abs(blocks).max(axis=1) / levels).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels).astype(np.int8).reshape(-1)[:n]
        if self.name == "int8":
            return {"values": q, "scales": scales}
        nibbles = (q + 8).astype(np.uint8)
        if n % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        return {"values": (nibbles[0::2] | (nibbles[1::2] << np.uint8(4))).astype(np.uint8), "scales": scales}

    def decode(self, parts: Mapping[str, np.ndarray], numel: int) -> np.ndarray:
        """The flat float32 tensor of ``numel`` elements the parts stand for (parts assumed valid:
        :func:`pwff_app.compression.wire.decode_record` checks them first)."""
        values = np.asarray(parts["values"])
        if self.name in ("none", "fp16"):
            return values.astype(np.float32)
        if self.name == "bf16":
            return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
        if self.name in _LEVELS:
            if self.name == "int4":
                values = np.stack([values & np.uint8(15), values >> np.uint8(4)], axis=1).reshape(-1)[:numel]
                values = values.astype(np.int16) - 8
            size = numel if self.block_size <= 0 else self.block_size
            scales = np.repeat(np.asarray(parts["scales"], dtype=np.float32), max(size, 1))[:numel]
            return values.astype(np.float32) * scales
        out = np.zeros(numel, dtype=np.float32)
        out[np.asarray(parts["indices"], dtype=np.int64)] = values
        return out

    def error_bound(self, x: np.ndarray) -> np.ndarray:
        """Per-element bound on ``|decode(encode(x)) - x|`` (the table in the module docstring)."""
        flat = np.abs(np.asarray(x, dtype=np.float32).reshape(-1))
        if self.name == "none":
            return np.zeros_like(flat)
        if self.name == "fp16":  # half an ulp in the normal range; subnormals: half the smallest step
            return np.maximum(flat * 2.0 ** -11, 2.0 ** -25)
        if self.name == "bf16":
            return np.maximum(flat * 2.0 ** -8, np.finfo(np.float32).tiny)
        if self.name in _LEVELS:
            size = flat.size if self.block_size <= 0 else self.block_size
            padded = np.zeros(self.blocks(flat.size) * max(size, 1), dtype=np.float32)
            padded[:flat.size] = flat
            block_max = padded.reshape(self.blocks(flat.size), -1).max(axis=1)
            # half a step, plus float32 rounding of the scale product
            bound = block_max / (2 * _LEVELS[self.name]) * (1 + 1e-6) + 1e-30
            return np.repeat(bound, max(size, 1))[:flat.size]
        kept = np.zeros(flat.size, dtype=bool)
        kept[self.encode(flat)["indices"]] = True
        return np.where(kept, 0.0, flat)


def parse_codec(text: str, block_size: int = 0) -> Codec:
    """``none | fp16 | bf16 | int8 | int4 | topk:<f>`` (0 < f < 1) as a :class:`Codec`; :class:`CodecError` else."""
    match = _TOPK.match(text)
    if match:
        fraction = float(match.group(1))
        if not 0 < fraction < 1:
            raise CodecError(f"top-k fraction must be in (0, 1), got {text!r}")
        return Codec("topk", fraction=fraction)
    if text not in CODEC_NAMES or text == "topk":
        raise CodecError(f"codec must be one of none, fp16, bf16, int8, int4, topk:<fraction>, got {text!r}")
    return Codec(text, block_size=block_size if text in _LEVELS else 0)
