"""COCO run-length encoding of binary masks (the mask format of ReVOS and MeViS), via pycocotools.

An RLE is ``{"size": [height, width], "counts": ...}`` where counts is the compressed string form (``str`` in
JSON files, ``bytes`` from pycocotools) or the uncompressed list of run lengths (column-major, starting with a
run of zeros). Decoding accepts all three; encoding writes the compressed ``str`` form.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pycocotools import mask as mask_utils

from veason_ray.datasets.records import DatasetFormatError


class RLEFormatError(DatasetFormatError):
    """A value that is not a valid COCO RLE; the message says where it came from."""


def encode_mask(mask: np.ndarray) -> dict:
    """A (H, W) boolean mask as a JSON-ready RLE ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask: expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _checked_size(rle: object, where: str) -> tuple[int, int]:
    if not isinstance(rle, dict):
        raise RLEFormatError(f"{where}: expected an RLE object {{size, counts}}, got {type(rle).__name__}")
    size = rle.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise RLEFormatError(f"{where}.size: expected [height, width] of non-negative int, got {size!r}")
    if "counts" not in rle:
        raise RLEFormatError(f"{where}.counts: missing")
    return int(size[0]), int(size[1])


def compressed_runs(counts: bytes, where: str = "rle") -> list[int]:
    """The run lengths of a compressed COCO RLE string, read exactly as pycocotools' `rleFrString` reads them
    (6-bit groups from character 48, 5 value bits and a continuation bit each, sign-extended; from the third run
    on, each value is a difference to the run two before), but checked: a character outside the alphabet, a
    string that ends inside a number, or a negative run is an RLEFormatError. pycocotools does not check, and on
    such strings it returns wrong masks or, in `merge`, never returns."""
    runs: list[int] = []
    value, shift = 0, 0
    for position, byte in enumerate(counts):
        code = byte - 48
        if not 0 <= code < 64:
            raise RLEFormatError(f"{where}.counts: character {chr(byte)!r} at {position} is not RLE")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise RLEFormatError(f"{where}.counts: run {len(runs)} is negative ({value})")
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise RLEFormatError(f"{where}.counts: truncated (the string ends inside a run length)")
    return runs


def _compressed(rle: dict, where: str) -> dict:
    """pycocotools' compressed form of an RLE whose counts are a str, bytes or a list of run lengths, checked to
    describe exactly height x width pixels."""
    height, width = _checked_size(rle, where)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            raw = counts.encode("ascii") if isinstance(counts, str) else counts
        except UnicodeEncodeError:
            raise RLEFormatError(f"{where}.counts: not an ASCII RLE string") from None
        total = sum(compressed_runs(raw, where))
        if total != height * width:
            raise RLEFormatError(
                f"{where}.counts: run lengths sum to {total}, expected height*width = {height * width}"
            )
        return {"size": [height, width], "counts": raw}
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise RLEFormatError(f"{where}.counts: expected a list of non-negative int run lengths")
        if sum(counts) != height * width:
            raise RLEFormatError(
                f"{where}.counts: run lengths sum to {sum(counts)}, expected height*width = {height * width}"
            )
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    raise RLEFormatError(f"{where}.counts: expected str, bytes or list of int, got {type(counts).__name__}")


def decode_rle(rle: dict, where: str = "rle") -> np.ndarray:
    """An RLE (counts as str, bytes or list of ints) as a (H, W) bool array. ``where`` names the value in
    error messages (file and JSON path)."""
    compressed = _compressed(rle, where)
    try:
        decoded = mask_utils.decode(compressed)
    except Exception as e:  # pycocotools raises bare Exception/ValueError on corrupt strings
        raise RLEFormatError(f"{where}.counts: not a valid compressed RLE string ({e})") from None
    return decoded.astype(bool)


def rle_area(rle: dict, where: str = "rle") -> int:
    """Number of foreground pixels, without decoding to a full array when counts are compressed."""
    compressed = _compressed(rle, where)  # validated: pycocotools reads it exactly
    return int(mask_utils.area(compressed))


def union_rle_area(rles: list[dict], where: str = "rle") -> int:
    """Foreground pixels of the union of same-size RLEs, without decoding them (pycocotools merge)."""
    compressed = [_compressed(r, f"{where}[{i}]") for i, r in enumerate(rles)]  # validated first
    if len(compressed) <= 1:
        return int(mask_utils.area(compressed[0])) if compressed else 0
    if len({tuple(c["size"]) for c in compressed}) > 1:
        raise RLEFormatError(
            f"{where}: RLEs of different sizes {[c['size'] for c in compressed]} in one union"
        )
    try:
        merged = mask_utils.merge(compressed, intersect=False)
    except Exception as e:  # pycocotools raises bare Exception on mismatched sizes or corrupt strings
        raise RLEFormatError(f"{where}: cannot merge the RLEs ({e})") from None
    return int(mask_utils.area(merged))


def union_masks(masks: Iterable[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Logical OR of boolean masks of ``shape``; all False when there are none."""
    out = np.zeros(shape, dtype=bool)
    for m in masks:
        if m.shape != tuple(shape):
            raise ValueError(f"union_masks: mask of shape {m.shape} in a union of shape {tuple(shape)}")
        out |= m
    return out
