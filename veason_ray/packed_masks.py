"""Bit-packed binary masks: the kernels under the J and F metrics (`metrics.py`).

Masks are packed into 64-bit words (64 pixels of a column a word) and every step of the DAVIS F-measure
(one-pixel boundaries, dilation with a disk, matching, counting) runs on the packed words, so one operation
touches 64 pixels. The packing is strided: bit b of word (r, x) holds pixel (y = b * word_rows + r, x). A shift
by one row is then a shift of whole word rows (plus a one-bit shift of the few word rows that wrap), and a shift
by one column is a shift of word columns, so every operation runs over long contiguous memory. Counts are exact
integers. Pure torch; the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WORD_BITS = 64
# Byte budget of one packed array per chunk on CPU: keeps the dilation's working set in a core's L2 cache.
_CPU_CHUNK_BYTES = 1 << 19

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_L16 = 0x00FF00FF00FF00FF
_H0001 = 0x0001000100010001
_L32 = 0x0000FFFF0000FFFF

MaskLike = torch.Tensor | np.ndarray


def disk_half_widths(radius: int) -> list[int]:
    """Half-width of the disk structuring element (skimage `disk(radius)`: dx^2 + dy^2 <= r^2) at each row
    offset dy = 0..radius, in pixels."""
    return [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]


def as_tensor(values: MaskLike, device: torch.device | str | None = None) -> torch.Tensor:
    if isinstance(values, np.ndarray) and (
        not values.flags.c_contiguous or any(s < 0 for s in values.strides)
    ):
        # numpy calls a view with a negative stride on a length-1 axis (a flipped single frame) contiguous,
        # and ascontiguousarray returns it as is; torch refuses every negative stride, so copy those too
        values = values.copy(order="C")
    return torch.as_tensor(values, device=device)


def as_bool(masks: MaskLike, device: torch.device | str | None) -> torch.Tensor:
    tensor = as_tensor(masks, device)
    if tensor.dtype != torch.bool:
        tensor = tensor != 0
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3:
        raise ValueError(f"masks must be (T, H, W) or (H, W), got shape {tuple(tensor.shape)}")
    return tensor


def mask_pair(
    pred: MaskLike, gt: MaskLike, device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as (T, H, W) bool on one device (`device`, else pred's)."""
    pred_t = as_bool(pred, device)
    gt_t = as_bool(gt, pred_t.device)
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"pred {tuple(pred_t.shape)} and gt {tuple(gt_t.shape)} differ in shape")
    return pred_t, gt_t


def _word_rows(height: int) -> int:
    return -(-height // WORD_BITS)


class PackedWorkspace:
    """Buffers for chunks of up to `frames` frames, reused from chunk to chunk: every step below writes into
    them in place (on CPU a fresh multi-megabyte tensor per operation costs page faults every time)."""

    def __init__(self, frames: int, height: int, width: int, device: torch.device) -> None:
        rows, pairs = _word_rows(height), 2 * frames
        self.plane_bytes = torch.empty((pairs, 8, rows, width), dtype=torch.uint8, device=device)
        self.word_bytes = torch.empty((pairs, rows, width, 8), dtype=torch.uint8, device=device)
        self.counted = torch.empty((6 * frames, rows, width), dtype=torch.int64, device=device)
        # Three (pairs, rows, width) arrays: boundary scratch, then dilation runs, then popcount scratch.
        self.scratch = torch.empty((6 * frames, rows, width), dtype=torch.int64, device=device)


def pack_masks(workspace: PackedWorkspace, *mask_batches: torch.Tensor) -> torch.Tensor:
    """(N_i, H, W) bool batches -> one (sum N_i, ceil(H/64), W) int64 array (in the workspace); bit b of word
    (r, x) holds pixel (b * ceil(H/64) + r, x). Rows past H are zero."""
    _, height, width = mask_batches[0].shape
    word_rows = _word_rows(height)
    n = sum(batch.shape[0] for batch in mask_batches)
    # Byte j, bit i of a word is pixel row (8j + i) * word_rows + r: the 8 bytes are gathered from bit planes
    # of whole rows (read in place from the masks; the bits are disjoint, so adding is OR-ing), then laid out
    # contiguously and read as one little-endian int64.
    packed_bytes = workspace.plane_bytes[:n].zero_()
    start = 0
    for batch in mask_batches:
        rows = batch.contiguous().view(torch.uint8)
        out = packed_bytes[start : start + rows.shape[0]]
        start += rows.shape[0]
        for bit in range(8):
            inside = sum((8 * byte + bit + 1) * word_rows <= height for byte in range(8))
            if inside:
                planes = rows.as_strided(
                    (rows.shape[0], inside, word_rows, width),
                    (height * width, 8 * word_rows * width, width, 1),
                    rows.storage_offset() + bit * word_rows * width,
                )
                out[:, :inside].add_(planes, alpha=1 << bit)
            first_row = (8 * inside + bit) * word_rows
            if inside < 8 and first_row < height:
                out[:, inside, : height - first_row].add_(rows[:, first_row:], alpha=1 << bit)
    words = workspace.word_bytes[:n]
    words.copy_(packed_bytes.permute(0, 2, 3, 1))
    return words.view(torch.int64).squeeze(-1)


def _shift_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Each int64 word shifted by `bits` toward its high bits (bits < 0: logical shift toward the low bits)."""
    if bits == 0:
        return words
    if abs(bits) >= WORD_BITS:
        return torch.zeros_like(words)
    return words << bits if bits > 0 else (words >> -bits) & ((1 << (WORD_BITS + bits)) - 1)


def _or_shifted_rows(dst: torch.Tensor, src: torch.Tensor, rows: int) -> None:
    """dst |= src moved along y on packed (N, word_rows, W) arrays: rows > 0 gives dst[y] |= src[y - rows],
    rows < 0 gives dst[y] |= src[y + |rows|]; pixels leaving the padded height are dropped."""
    nr = src.shape[-2]
    whole, rest = divmod(abs(rows), nr)
    sign = 1 if rows > 0 else -1
    if rest == 0:
        dst.bitwise_or_(_shift_bits(src, sign * whole))
    elif rows > 0:
        dst[..., rest:, :].bitwise_or_(_shift_bits(src[..., : nr - rest, :], whole))
        dst[..., :rest, :].bitwise_or_(_shift_bits(src[..., nr - rest :, :], whole + 1))
    else:
        dst[..., : nr - rest, :].bitwise_or_(_shift_bits(src[..., rest:, :], -whole))
        dst[..., nr - rest :, :].bitwise_or_(_shift_bits(src[..., :rest, :], -whole - 1))


def rows_below(height: int, rows: int, device: torch.device) -> torch.Tensor:
    """Packed column (word_rows, 1) with the bits of pixel rows y < rows set (of a mask `height` rows high)."""
    word_rows = _word_rows(height)
    words = []
    for r in range(word_rows):
        word = sum(1 << bit for bit in range(WORD_BITS) if bit * word_rows + r < rows)
        words.append(word - (1 << WORD_BITS) if word >= 1 << (WORD_BITS - 1) else word)
    return torch.tensor(words, dtype=torch.int64, device=device)[:, None]


def _boundaries(
    packed: torch.Tensor, not_last_row: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> None:
    """DAVIS `_seg2bmap` on packed masks, into `out`: a pixel is on the boundary when it differs from its right,
    bottom or bottom-right neighbour, each comparison made only where that neighbour exists.
    not_last_row: rows_below(H, H - 1); scratch: (2, *packed.shape) int64."""
    below, other = scratch[0].zero_(), scratch[1][..., :-1]
    _or_shifted_rows(below, packed, -1)
    left, inner = packed[..., :-1], out[..., :-1]
    torch.bitwise_xor(left, below[..., :-1], out=inner)
    inner.bitwise_or_(torch.bitwise_xor(left, below[..., 1:], out=other)).bitwise_and_(not_last_row)
    inner.bitwise_or_(torch.bitwise_xor(left, packed[..., 1:], out=other))
    torch.bitwise_xor(packed[..., -1], below[..., -1], out=out[..., -1]).bitwise_and_(not_last_row[:, 0])


def _grow_rows(dst: torch.Tensor, run: torch.Tensor, step: int) -> None:
    """dst[y] = run[y] | run[y - step] | run[y + step] on packed arrays (dst must not overlap run)."""
    nr = run.shape[-2]
    if step >= nr:
        dst.copy_(run)
        _or_shifted_rows(dst, run, step)
    else:  # the first OR writes straight into dst: one pass fewer than copy-then-OR
        torch.bitwise_or(run[..., step:, :], run[..., : nr - step, :], out=dst[..., step:, :])
        torch.bitwise_left_shift(run[..., nr - step :, :], 1, out=dst[..., :step, :])
        dst[..., :step, :].bitwise_or_(run[..., :step, :])
    _or_shifted_rows(dst, run, -step)


def _dilate_disk(packed: torch.Tensor, radius: int, runs: torch.Tensor) -> torch.Tensor:
    """Binary dilation of packed masks with the disk of `radius` pixels (cv2.dilate with skimage disk), into
    runs[2]; runs: (3, *packed.shape) int64 buffers.

    The disk is the union over column offsets dx of vertical runs of half-length w(dx). Vertical dilations of
    growing length are built incrementally (v_{w+a} = v_w | v_w shifted by +a rows | by -a rows, a <= w + 1, so
    what falls off the padded height is always covered by the centre term), and each is OR-ed into the output
    at the column offsets +-dx that use its length.
    """
    half_widths = disk_half_widths(radius)
    out = runs[2].zero_()
    run, run_length, spare = packed, 0, 0
    for dx in range(radius, -1, -1):
        while run_length < half_widths[dx]:
            step = min(run_length + 1, half_widths[dx] - run_length)
            _grow_rows(runs[spare], run, step)
            run, run_length, spare = runs[spare], run_length + step, 1 - spare
        if dx == 0:
            out.bitwise_or_(run)
        else:
            out[..., dx:].bitwise_or_(run[..., :-dx])
            out[..., :-dx].bitwise_or_(run[..., dx:])
    return out


def popcount(words: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Number of set bits per leading index: (N, word_rows, W) int64 -> (N,) int64. Overwrites `words`;
    scratch: a buffer of the same shape.

    SWAR bit counting down to per-byte counts (<= 8), then byte lanes are summed over up to 31 word rows at a
    time (<= 248, no carry between lanes) before the lanes of the much smaller result are added up."""
    x, y = words, scratch
    x.sub_(torch.bitwise_right_shift(x, 1, out=y).bitwise_and_(_M1))
    torch.bitwise_right_shift(x, 2, out=y).bitwise_and_(_M2)
    x.bitwise_and_(_M2).add_(y)
    x.add_(torch.bitwise_right_shift(x, 4, out=y)).bitwise_and_(_M4)
    total = torch.zeros(words.shape[0], dtype=torch.int64, device=words.device)
    for first_row in range(0, words.shape[-2], 31):
        lanes = x[:, first_row : first_row + 31].sum(dim=1)
        lanes = (lanes & _L16) + ((lanes >> 8) & _L16)
        total += ((lanes * _H0001) >> 48).sum(dim=-1)
    return total


def cpu_chunk_frames(height: int, width: int, device: torch.device) -> int | None:
    if device.type != "cpu":
        return None
    bytes_per_frame = 2 * _word_rows(height) * width * 8
    return max(1, _CPU_CHUNK_BYTES // bytes_per_frame)


def region_and_boundary_counts(
    pred: torch.Tensor, gt: torch.Tensor, radius: int, not_last_row: torch.Tensor, workspace: PackedWorkspace
) -> torch.Tensor:
    """(6, T) int64 counts: |P&G|, |P|G|, |B_pred|, |B_gt|, |B_pred & dil(B_gt)|, |B_gt & dil(B_pred)|."""
    t = pred.shape[0]
    packed = pack_masks(workspace, pred, gt)
    counted, scratch = workspace.counted[: 6 * t], workspace.scratch[: 6 * t]
    runs = scratch.view(3, 2 * t, *packed.shape[1:])
    bmaps = counted[2 * t : 4 * t]
    _boundaries(packed, not_last_row, bmaps, runs[:2])
    dilated = _dilate_disk(bmaps, radius, runs)
    torch.bitwise_and(packed[:t], packed[t:], out=counted[:t])
    torch.bitwise_or(packed[:t], packed[t:], out=counted[t : 2 * t])
    torch.bitwise_and(bmaps[:t], dilated[t:], out=counted[4 * t : 5 * t])
    torch.bitwise_and(bmaps[t:], dilated[:t], out=counted[5 * t :])
    return popcount(counted, scratch).view(6, t)


def sum_bytes(values: torch.Tensor) -> torch.Tensor:
    """Exact per-frame sums of uint8 (or bool) values, (T, ...) -> (T,) int64, added up eight bytes at a time
    in 16- then 32-bit lanes of int64 words (torch's own uint8 reduction is many times slower)."""
    flat = values.reshape(values.shape[0], -1).view(torch.uint8)
    pad = (-flat.shape[1]) % (8 * 128)
    if pad or flat.storage_offset() % 8 or not flat.is_contiguous():
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.view(torch.int64)
    lanes = (words & _L16) + ((words >> 8) & _L16)
    lanes = lanes.view(words.shape[0], -1, 128).sum(dim=-1)
    lanes = (lanes & _L32) + ((lanes >> 16) & _L32)
    return ((lanes & 0xFFFFFFFF) + (lanes >> 32)).sum(dim=-1)
