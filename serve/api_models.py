"""The HTTP API's request and response models (`/v1/...`): what the OpenAPI schema at /openapi.json is made
of, precise enough to generate a client from. Field descriptions are the API's documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

API_VERSION = "v1"


class SegmentOptions(BaseModel):
    """What a segmentation request asks for beyond the answer (the same fields as form fields of an upload)."""

    model_config = ConfigDict(extra="forbid")

    num_frames: int | None = Field(
        None, ge=1, description="frames the policy sees, evenly spaced, first and last included "
        "(default: the model's evaluation setting; at most the server's max_policy_frames)",
    )  # fmt: skip
    masks: Literal["rle", "none"] = Field(
        "rle", description="rle: a COCO RLE mask for every frame of the video; none: no masks"
    )
    overlay: bool = Field(False, description="return an .mp4 of every frame with its mask and the boxes")
    reasoning: bool = Field(True, description="return the policy's reasoning and its raw answer text")


class SegmentRequest(SegmentOptions):
    """Segment what `query` describes in a video given as a URL or as frames (exactly one of the two)."""

    query: str = Field(..., min_length=1, description="what to segment, e.g. 'the dog that is about to jump'")
    video_url: str | None = Field(
        None, description="an http(s):// or s3:// URL of a video file (.mp4 or any format FFmpeg reads)"
    )
    frames: list[str] | None = Field(
        None, min_length=1, description="the video as frames in order: base64 JPEG or PNG, all of one size"
    )
    fps: float | None = Field(
        None, gt=0, le=240, description="frame rate of `frames` (the overlay's; default: the server's)"
    )


class ModelInfo(BaseModel):
    name: str = Field(..., description="the policy checkpoint's name")
    version: str = Field(..., description="the checkpoint's version: configured, or a digest of its files")


class VideoInfo(BaseModel):
    frames: int
    height: int
    width: int
    fps: float | None


class FrameMask(BaseModel):
    frame: int = Field(..., description="the frame's index in the video (0-based)")
    size: list[int] = Field(..., description="[height, width]")
    counts: str = Field(..., description="COCO RLE counts (pycocotools' compressed string)")


class Answer(BaseModel):
    """The policy's answer placed on the video."""

    request_id: str
    model: ModelInfo
    query: str
    video: VideoInfo
    frame_indices: list[int] = Field(..., description="the frames the policy saw")
    keyframe: int | None = Field(..., description="the frame the boxes are on; null when none can be used")
    boxes: list[list[float]] = Field(
        ..., description="[x1, y1, x2, y2] in the video's pixels, on the keyframe"
    )
    reasoning: str | None = Field(None, description="the policy's think text (when asked for)")
    answer: str | None = Field(None, description="the policy's raw answer text (when reasoning is asked for)")
    empty_reason: str | None = Field(
        ..., description="why no mask follows (unparsable answer, keyframe outside the video, no boxes)"
    )


class SegmentResponse(Answer):
    masks: list[FrameMask] | None = Field(..., description="one per frame in frame order (masks=rle)")
    mask_frames_nonempty: int = Field(..., description="frames whose mask has at least one pixel")
    overlay_mp4: str | None = Field(None, description="base64 .mp4 of the overlay video (overlay=true)")
    seconds: dict[str, float] = Field(
        ..., description="seconds per stage: read, policy, propagate, encode, total"
    )


class StreamAnswer(Answer):
    """The first line of a streamed response."""

    event: Literal["answer"] = "answer"


class StreamMask(FrameMask):
    """One line per frame, in propagation order (the keyframe, forward to the end, then backward)."""

    event: Literal["mask"] = "mask"


class StreamDone(BaseModel):
    """The last line of a streamed response that finished."""

    event: Literal["done"] = "done"
    mask_frames: int
    seconds: dict[str, float]


class StreamError(BaseModel):
    """The last line of a streamed response that failed after it started."""

    event: Literal["error"] = "error"
    status: int
    message: str
    request_id: str


class ErrorBody(BaseModel):
    status: int
    field: str | None = Field(None, description="the request field at fault, dotted (e.g. body.num_frames)")
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "ready", "not ready"]
    model: ModelInfo | None = None
    detail: str | None = None


class Limits(BaseModel):
    max_upload_mb: float
    max_frames: int
    max_duration_s: float
    max_side: int
    max_query_chars: int
    max_policy_frames: int
    default_num_frames: int
    api_key_required: bool


class ServerInfo(BaseModel):
    api_version: str = API_VERSION
    model: ModelInfo
    limits: Limits
