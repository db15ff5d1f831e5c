"""Pictures people would rather look at than read: masks over frames, boxes on the keyframe, as a grid, a
strip of the frames the policy saw, or a playable video. A picture that leaves the program carries a caption
band below its frames (`Caption`): the question, which colour marks what, and the scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

GT_COLOUR = (255, 0, 255)  # ground-truth outline: magenta
PRED_COLOUR = (255, 40, 40)  # predicted mask: red tint
BOX_COLOUR = (255, 220, 0)  # predicted boxes on the keyframe: yellow
TEXT_COLOUR = (255, 255, 255)
KEYFRAME_BORDER = 3  # pixels of the yellow border around the keyframe
STRIP_TILE_WIDTH = 280  # pixels: sampled_frames_strip shrinks wider frames to this
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_STRIP_SHADE = 0.3  # what is left of the picture under a text strip, so the text stays readable
_CAPTION_LINES = 2  # a longer caption is cut with "..."
BAND_BACKGROUND = (24, 24, 24)  # the caption band below a picture's frames
_BAND_QUESTION_LINES = 3  # a longer question is cut with "..."
MIN_CAPTIONED_WIDTH = 320  # pixels: narrower pictures are enlarged before their caption band is added
_GT_BOX_MARGIN = 3  # pixels: GT boxes drawn this far outside their edges stay seen under a perfect answer box

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Caption:
    """What a picture says about itself, in a dark band below its frames: the question asked, the legend
    ((RGB colour, what that colour marks) pairs, each shown after a square of its colour) and the scores."""

    question: str
    legend: tuple[tuple[Colour, str], ...] = ()
    scores: str = ""


def overlay_frame(
    frame: np.ndarray, pred_mask: np.ndarray | None, gt_mask: np.ndarray | None, alpha: float = 0.45
) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame with the predicted mask tinted and the GT mask outlined."""
    out = frame.astype(np.float32).copy()
    if pred_mask is not None and pred_mask.any():
        out[pred_mask] = (1 - alpha) * out[pred_mask] + alpha * np.array(PRED_COLOUR, dtype=np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    if gt_mask is not None and gt_mask.any():
        contours, _ = cv2.findContours(gt_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, GT_COLOUR, 1)
    return out


def _mark_keyframe(tile: np.ndarray, boxes: np.ndarray | None) -> None:
    """Draw, in place, the boxes (pixels of ``tile``, [x1, y1, x2, y2]) and a border: this is the keyframe."""
    for x1, y1, x2, y2 in np.asarray(boxes if boxes is not None else [], dtype=np.float64).reshape(-1, 4):
        cv2.rectangle(tile, (int(x1), int(y1)), (int(x2), int(y2)), BOX_COLOUR, 2)
    cv2.rectangle(tile, (0, 0), (tile.shape[1] - 1, tile.shape[0] - 1), BOX_COLOUR, KEYFRAME_BORDER)


def _mark_ground_truth(tile: np.ndarray, boxes: np.ndarray | None) -> None:
    """Draw, in place, the GT boxes (pixels of ``tile``) in GT_COLOUR, _GT_BOX_MARGIN pixels outside their
    edges; empty boxes (an object absent from the frame: zeros) are skipped."""
    m = _GT_BOX_MARGIN
    for x1, y1, x2, y2 in np.asarray(boxes if boxes is not None else [], dtype=np.float64).reshape(-1, 4):
        if x2 > x1 and y2 > y1:
            cv2.rectangle(tile, (int(x1) - m, int(y1) - m), (int(x2) + m, int(y2) + m), GT_COLOUR, 2)


def ground_truth_keyframe(gt_masks: np.ndarray, frame_indices: Sequence[int]) -> int | None:
    """The frame index (among ``frame_indices``, positions of the (T, H, W) ``gt_masks``) with the largest GT
    area: the keyframe the keyframe reward scores 1; None when no frame has a GT pixel."""
    areas = np.asarray(gt_masks).reshape(len(frame_indices), -1).sum(axis=1)
    return int(frame_indices[int(np.argmax(areas))]) if areas.size and areas.max() > 0 else None


def _font_scale(width: int) -> float:
    """cv2 font scale for text on an image ``width`` pixels wide: small on thumbnails, at most 0.6."""
    return float(np.clip(width / 700, 0.35, 0.6))


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def _fit_lines(text: str, width: int, scale: float, max_lines: int) -> list[str]:
    """``text`` wrapped at spaces into lines at most ``width`` pixels wide; a word too long for a line is cut,
    and text past ``max_lines`` lines is dropped with "..." at the end of the last line."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and _text_width(candidate, scale) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
        while _text_width(lines[-1], scale) > width and len(lines[-1]) > 1:
            lines[-1] = lines[-1][:-1]
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(last + "...", scale) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def _line_height(scale: float) -> int:
    (_, height), baseline = cv2.getTextSize("Ag", _FONT, scale, 1)
    return height + baseline + 4


def _text_strip(
    image: np.ndarray, lines: Sequence[str], top: int, colour: tuple[int, int, int] = TEXT_COLOUR
) -> None:
    """Darken, in place, a full-width band of ``image`` from row ``top`` and write ``lines`` on it."""
    if not lines:
        return
    scale = _font_scale(image.shape[1])
    step = _line_height(scale)
    band = image[top : top + step * len(lines) + 2]
    band[:] = (band * _STRIP_SHADE).astype(np.uint8)
    for i, line in enumerate(lines):
        baseline_y = top + (i + 1) * step - cv2.getTextSize("Ag", _FONT, scale, 1)[1] - 1
        cv2.putText(image, line, (4, baseline_y), _FONT, scale, colour, 1, cv2.LINE_AA)


def _strip_height(lines: int, width: int) -> int:
    """Rows a :func:`_text_strip` of ``lines`` lines takes on an image ``width`` pixels wide."""
    return _line_height(_font_scale(width)) * lines + 2 if lines else 0


def _band_font_scale(width: int) -> float:
    """cv2 font scale in a caption band ``width`` pixels wide: never below 0.5 (capitals about 11 pixels
    high, readable under a 320x240 frame; long text wraps instead), at most 0.8."""
    return float(np.clip(width / 1000, 0.5, 0.8))


# one line of a band: (swatch colour or None, text, text colour) runs, left to right
_Run = tuple[Colour | None, str, Colour]


def _render_band(width: int, lines: Sequence[Sequence[_Run]]) -> np.ndarray:
    """A (rows, width, 3) band of BAND_BACKGROUND with ``lines`` written on it; a swatch is a filled square
    of its colour before its text."""
    scale = _band_font_scale(width)
    step = _line_height(scale)
    text_height = cv2.getTextSize("Ag", _FONT, scale, 1)[0][1]
    band = np.empty((step * len(lines) + 6, width, 3), dtype=np.uint8)
    band[:] = BAND_BACKGROUND
    for row, runs in enumerate(lines):
        baseline_y, x = 3 + (row + 1) * step - 5, 6
        for swatch, text, colour in runs:
            if swatch is not None:
                cv2.rectangle(band, (x, baseline_y - text_height), (x + text_height, baseline_y), swatch, -1)
                x += text_height + 6
            cv2.putText(band, text, (x, baseline_y), _FONT, scale, colour, 1, cv2.LINE_AA)
            x += _text_width(text, scale) + 16
    return band


def caption_band(caption: Caption, width: int) -> np.ndarray:
    """``caption`` as a band ``width`` pixels wide, to stand below (or above) a picture: "Q: <question>"
    (wrapped, at most three lines), the legend entries packed into lines, the scores (wrapped)."""
    scale = _band_font_scale(width)
    room = width - 12
    swatch = cv2.getTextSize("Ag", _FONT, scale, 1)[0][1] + 6
    lines: list[list[_Run]] = [
        [(None, line, TEXT_COLOUR)]
        for line in _fit_lines(f"Q: {caption.question}", room, scale, _BAND_QUESTION_LINES)
    ]
    legend: list[list[_Run]] = []
    used = room  # a fresh line for the first entry
    for colour, text in caption.legend:
        parts = _fit_lines(text, room - swatch, scale, 2)
        needed = swatch + _text_width(parts[0], scale) if parts else swatch
        if len(parts) == 1 and used + 16 + needed <= room:
            legend[-1].append((colour, parts[0], TEXT_COLOUR))
            used += 16 + needed
            continue
        legend.append([(colour, parts[0] if parts else "", TEXT_COLOUR)])
        legend += [[(None, "  " + part, TEXT_COLOUR)] for part in parts[1:]]
        used = needed if len(parts) == 1 else room
    lines += legend
    lines += [[(None, line, BOX_COLOUR)] for line in _fit_lines(caption.scores, room, scale, 3)]
    return _render_band(width, lines)


def _enlargement(width: int) -> int:
    """How many times a picture ``width`` pixels wide is enlarged to be at least MIN_CAPTIONED_WIDTH wide."""
    return max(1, -(-MIN_CAPTIONED_WIDTH // width))


def _enlarged(image: np.ndarray) -> np.ndarray:
    """``image`` enlarged (nearest) `_enlargement` times, so that a caption band below it has room for legible
    text; unchanged when it is wide enough."""
    factor = _enlargement(image.shape[1])
    return image if factor == 1 else np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _label_band(width: int, text: str, colour: Colour) -> np.ndarray:
    """One line (a frame's "t=<index>" label) in a band ``width`` pixels wide."""
    return _render_band(width, [[(None, text, colour)]])


def video_overlay_grid(
    frames: np.ndarray,
    pred_masks: np.ndarray,
    gt_masks: np.ndarray,
    keyframe: int | None = None,
    boxes: np.ndarray | None = None,
    columns: int = 4,
    max_frames: int = 12,
) -> np.ndarray:
    """A grid of up to `max_frames` evenly chosen frames (T, H, W, 3) with masks; the keyframe carries the
    boxes the propagator was given (in the frames' pixels) and a yellow border."""
    count = len(frames)
    chosen = np.unique(np.linspace(0, count - 1, num=min(count, max_frames)).round().astype(int)).tolist()
    if keyframe is not None and 0 <= keyframe < count and keyframe not in chosen:
        chosen = sorted(chosen[:-1] + [keyframe])
    tiles = []
    for index in chosen:
        tile = overlay_frame(frames[index], pred_masks[index], gt_masks[index])
        if index == keyframe:
            _mark_keyframe(tile, boxes)
        cv2.putText(tile, f"t={index}", (4, 14), _FONT, 0.45, TEXT_COLOUR, 1, cv2.LINE_AA)
        tiles.append(tile)
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    grid = np.zeros((rows * height, min(columns, len(tiles)) * width, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = tile
    return grid


def _check_video(frames: np.ndarray, masks: np.ndarray, gt_masks: np.ndarray | None) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8 RGB, got {frames.shape} {frames.dtype}")
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    for name, value in (("masks", masks), ("gt_masks", gt_masks)):
        if value is not None and value.shape != frames.shape[:3]:
            raise ValueError(f"{name} of shape {value.shape} for frames of shape {frames.shape}")


def _video_codec() -> str:
    """H.264 when the installed PyAV build has an x264 encoder, MPEG-4 part 2 otherwise."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _frame_label(index: int, keyframe: int | None, gt_keyframe: int | None) -> tuple[str, Colour]:
    """A video frame's line in its caption band: "t=<index>", and which keyframe it is."""
    words = [f"t={index}"]
    words += ["answer keyframe"] if index == keyframe else []
    words += ["GT keyframe"] if index == gt_keyframe else []
    colour = BOX_COLOUR if index == keyframe else GT_COLOUR if index == gt_keyframe else TEXT_COLOUR
    return "  ".join(words), colour


def write_overlay_video(
    path: str | Path,
    frames: np.ndarray,
    masks: np.ndarray,
    *,
    keyframe: int | None = None,
    boxes: np.ndarray | None = None,
    caption: str = "",
    gt_masks: np.ndarray | None = None,
    fps: float = 6.0,
    gt_keyframe: int | None = None,
    gt_boxes: np.ndarray | None = None,
    band: Caption | None = None,
    still: str | Path | None = None,
) -> Path:
    """Write every frame of a video, with its predicted mask tinted, as a playable .mp4 at ``fps`` frames per
    second; returns ``path`` (parent folders are created).

    ``frames`` (T, H, W, 3) uint8 RGB, ``masks`` and ``gt_masks`` (T, H, W) bool; the GT mask, when given, is
    outlined in magenta, and on frame ``gt_keyframe`` the ``gt_boxes`` (K, 4) are drawn in magenta. On frame
    ``keyframe`` (a frame index; none outside [0, T)) the ``boxes`` (K, 4) [x1, y1, x2, y2] in video pixels
    are drawn in yellow inside a yellow border. Without ``band``, each frame carries the caption (wrapped to
    two lines, cut with "...") in a dark strip at the top and "t=<index>" ("keyframe" on the keyframe) in one
    at the bottom. With ``band``, the text leaves the frames: below each frame its "t=<index>" line (naming
    the answer's and the GT's keyframe) and the `caption_band` (a video narrower than MIN_CAPTIONED_WIDTH is
    enlarged a whole number of times first). ``still``: that picture of one frame (the
    answer's keyframe, else the GT's, else the first) is also written there as a PNG.

    Encoded with H.264 (libx264, yuv420p). yuv420p needs even sizes, so an odd width or height is padded by
    one black pixel at the right or bottom. A PyAV build without libx264 gets MPEG-4 part 2 ("mpeg4")
    instead, which players also read from an .mp4. PyAV is imported here: training processes that draw
    pictures (the GRPO driver's samples) never need it."""
    import av

    frames = np.asarray(frames)
    masks = np.asarray(masks, dtype=bool)
    gt = None if gt_masks is None else np.asarray(gt_masks, dtype=bool)
    _check_video(frames, masks, gt)
    count, height, width = frames.shape[:3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    caption_lines = _fit_lines(caption, width - 8, _font_scale(width), _CAPTION_LINES)
    bottom = max(0, height - _strip_height(1, width))
    shown_width = width * _enlargement(width)
    below = None if band is None else caption_band(band, shown_width)

    def picture(index: int) -> np.ndarray:
        image = overlay_frame(frames[index], masks[index], None if gt is None else gt[index])
        if below is None:
            _text_strip(image, caption_lines, 0)
            label, colour = (
                (f"t={index}  keyframe", BOX_COLOUR) if index == keyframe else (f"t={index}", TEXT_COLOUR)
            )
            _text_strip(image, [label], bottom, colour)
        if index == gt_keyframe:
            _mark_ground_truth(image, gt_boxes)
        if index == keyframe:
            _mark_keyframe(image, boxes)
        if below is None:
            return image
        label = _label_band(shown_width, *_frame_label(index, keyframe, gt_keyframe))
        return np.concatenate([_enlarged(image), label, below])

    if still is not None:
        shown = next((i for i in (keyframe, gt_keyframe) if i is not None and 0 <= i < count), 0)
        save_png(picture(shown), still)
    first = picture(0)
    rows, columns = first.shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(_video_codec(), rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = columns + columns % 2, rows + rows % 2, "yuv420p"
        for index in range(count):
            image = np.pad(first if index == 0 else picture(index), ((0, rows % 2), (0, columns % 2), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def sampled_frames_strip(
    frames: np.ndarray,
    frame_indices: Sequence[int],
    keyframe: int | None = None,
    boxes_560: np.ndarray | None = None,
    caption: str = "",
    *,
    gt_boxes_560: Sequence[np.ndarray] | None = None,
    band: Caption | None = None,
) -> np.ndarray:
    """The N frames the policy saw, (N, S, S, 3) uint8 RGB, side by side as one RGB image, each shrunk to at
    most STRIP_TILE_WIDTH pixels wide and labelled "(<index>s)" with its frame index.

    The tile whose frame index equals ``keyframe`` gets a yellow border and the boxes ``boxes_560`` (K, 4)
    [x1, y1, x2, y2] in the S x S pixels of ``frames`` (scaled with the tile); ``gt_boxes_560``, one (K, 4)
    array per frame in the same pixels, are drawn in magenta on every tile. The caption, wrapped to the
    strip's width (two lines at most), stands in a dark band above the tiles; ``band`` (`caption_band`)
    below them (a strip narrower than MIN_CAPTIONED_WIDTH is enlarged a whole number of times first)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (N, S, S, 3) RGB, got shape {frames.shape}")
    if len(frame_indices) != len(frames):
        raise ValueError(f"{len(frame_indices)} frame indices for {len(frames)} frames")
    height, width = frames.shape[1:3]
    scale = min(1.0, STRIP_TILE_WIDTH / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    tiles = []
    for frame, index in zip(frames, frame_indices, strict=True):
        tile = np.ascontiguousarray(
            frame if scale == 1.0 else cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        )
        _text_strip(tile, [f"({int(index)}s)"], 0)
        if gt_boxes_560 is not None:
            _mark_ground_truth(tile, np.asarray(gt_boxes_560[len(tiles)], dtype=np.float64) * scale)
        if keyframe is not None and int(index) == keyframe:
            _mark_keyframe(
                tile, None if boxes_560 is None else np.asarray(boxes_560, dtype=np.float64) * scale
            )
        tiles.append(tile)
    row = np.concatenate(tiles, axis=1)
    lines = _fit_lines(caption, row.shape[1] - 8, _font_scale(row.shape[1]), _CAPTION_LINES)
    header = np.zeros((_strip_height(len(lines), row.shape[1]), row.shape[1], 3), dtype=np.uint8)
    _text_strip(header, lines, 0)
    if band is None:
        return np.concatenate([header, row], axis=0)
    row = _enlarged(row)
    return np.concatenate([_enlarged(header), row, caption_band(band, row.shape[1])], axis=0)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG at ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
