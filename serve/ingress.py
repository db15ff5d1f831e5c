"""The ingress deployment of the Serve app: the HTTP API (`/v1/...`, FastAPI, schema at /openapi.json), the
page at `/`, and the guard rails in front of the models.

A segmentation request goes through the inference API's steps (veason_ray/inference.py), each where it runs
best: the video is decoded here within the limits (serve/video_intake.py), `policy_input` builds what the
policy sees, the policy deployment answers, `locate_answer` places the answer on the video, and the mask
deployment propagates it (`propagate_answers`, or frame by frame for a streamed response). Masks are encoded
here as COCO RLE, and the overlay video drawn, in a thread pool.

Guard rails: an optional bearer key (`serve.api_key_env`) on every route but liveness and the page itself,
compared in constant time; request bodies capped before they are read; limits on the video; every model call
under `serve.request_timeout_s`. Malformed input gets a 4xx naming the field; a model error a 5xx with the
request id, and the replica keeps serving. Logs carry the request id, sizes and timings, never the key, the
video or a URL's query string.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api_models import (
    API_VERSION,
    ErrorResponse,
    FrameMask,
    Health,
    Limits,
    ModelInfo,
    SegmentOptions,
    SegmentRequest,
    SegmentResponse,
    ServerInfo,
    StreamAnswer,
    StreamDone,
    StreamError,
    StreamMask,
    VideoInfo,
)
from serve.mask_deployment import unbitpack_masks
from serve.video_intake import (
    RequestError,
    check_size,
    request_workdir,
    video_from_frames,
    video_from_upload,
    video_from_url,
)
from veason_ray.config import VeasonConfig
from veason_ray.datasets.rle import encode_mask
from veason_ray.inference import (
    LocatedAnswer,
    PolicyInput,
    VideoSegmentation,
    check_answer_budget,
    locate_answer,
    policy_input,
)
from veason_ray.video_decoding import WholeVideo

logger = logging.getLogger("ray.serve")  # Serve's replica logger: the replica log file and stderr

PAGE = Path(__file__).parent / "static" / "index.html"
PUBLIC_PATHS = frozenset({f"/{API_VERSION}/health/live", "/"})  # no key asked for (the page holds no data)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 411, 413, 422, 500, 503, 504)
}

app = FastAPI(
    title="veason-ray",
    version=API_VERSION,
    description="Video reasoning segmentation: a question about a video in, the policy's keyframe, boxes and "
    "reasoning and a mask of every frame out (Qwen2.5-VL policy + SAM2).",
)


class Guard:
    """What the middleware checks before a request reaches a route: the key and the body size."""

    def __init__(self, api_key: str, max_body_bytes: int):
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.api_key.encode())


def error_response(request: Request, status: int, field: str | None, message: str) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "")
    body = {"error": {"status": status, "field": field, "message": message, "request_id": request_id}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


@app.middleware("http")
async def guard_and_log(request: Request, call_next):
    started = time.perf_counter()
    # Serve's proxy gives every request an id (the client's X-Request-ID, or a new one) in this header and in
    # the response's; it is also the id in Serve's access log
    incoming = request.headers.get("x-request-id", "")
    request.state.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex[:16]
    request.state.log = ""
    guard: Guard | None = getattr(request.app.state, "guard", None)
    length = request.headers.get("content-length")
    response = None
    if guard is not None and request.url.path not in PUBLIC_PATHS:
        if not guard.authorized(request.headers.get("authorization")):
            response = error_response(request, 401, "Authorization", "a valid 'Bearer <key>' is required")
    if response is None and guard is not None and request.method in ("POST", "PUT", "PATCH"):
        if length is None or not length.isdigit():
            response = error_response(request, 411, "Content-Length", "send the body with a Content-Length")
        elif int(length) > guard.max_body_bytes:
            response = error_response(
                request, 413, "body", f"{int(length) / 2**20:.1f} MiB, more than the "
                f"{guard.max_body_bytes / 2**20:.0f} MiB a request body may have",
            )  # fmt: skip
    if response is None:
        response = await call_next(request)
    model: ModelInfo | None = getattr(request.app.state, "model", None)
    if model is not None:  # known from the first request that reached the policy on
        response.headers["X-Model-Name"], response.headers["X-Model-Version"] = model.name, model.version
    logger.info(
        "request %s %s %s -> %d, %s bytes in, %.3f s%s",
        request.state.request_id, request.method, request.url.path, response.status_code, length or 0,
        time.perf_counter() - started, request.state.log,
    )  # fmt: skip
    return response


@app.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return error_response(request, error.status, error.field, error.message)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ())]
        if location and location[0] in ("body", "query", "path", "header"):
            location = location[1:]
        problems.append((".".join(location) or "body", item.get("msg", "invalid")))
    message = "; ".join(f"{field}: {msg}" for field, msg in problems)
    return error_response(request, 422, problems[0][0] if problems else None, message)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return error_response(request, error.status_code, None, str(error.detail))


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug of ours: still the schema's error body, with the request id (Starlette logs the traceback)."""
    known_id = getattr(request.state, "request_id", "")  # set by guard_and_log, which runs first
    return error_response(
        request, 500, None, f"internal error ({type(error).__name__}); request id {known_id}"
    )


def request_id(request: Request) -> str:
    return request.state.request_id


def frame_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    return [{"frame": i, **encode_mask(mask)} for i, mask in enumerate(masks)]


def overlay_mp4(video: WholeVideo, result: VideoSegmentation, fps: float) -> str:
    """The overlay video of a result as base64 .mp4 (visualize.write_overlay_video)."""
    from veason_ray.visualize import write_overlay_video

    with request_workdir() as folder:
        path = write_overlay_video(
            Path(folder) / "overlay.mp4",
            video.frames,
            result.masks,
            keyframe=result.keyframe,
            boxes=result.boxes,
            caption=result.query,
            fps=fps,
        )
        return base64.b64encode(path.read_bytes()).decode("ascii")


@serve.deployment(name="ingress")
@serve.ingress(app)
class SegmentationAPI:
    def __init__(self, cfg: VeasonConfig, policy: DeploymentHandle, masks: DeploymentHandle):
        self.cfg, self.settings = cfg, cfg.serve
        self.policy, self.masks = policy, masks
        api_key = os.environ.get(self.settings.api_key_env, "") if self.settings.api_key_env else ""
        # base64 frames take 4/3 of their bytes, and the rest of a body is small
        app.state.guard = Guard(api_key, int(self.settings.max_upload_mb * 2**20 * 4 / 3) + 2**20)
        self.encoders = ThreadPoolExecutor(max(1, self.settings.overlay_workers), "veason-encode")
        app.state.model = None  # the policy's name and version, asked once (also put on every response)

    # ---- information ----

    async def model_info(self) -> ModelInfo:
        if app.state.model is None:
            info = await asyncio.wait_for(self.policy.info.remote(), self.settings.request_timeout_s)
            app.state.model = ModelInfo(**info)
        return app.state.model

    @app.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get(f"/{API_VERSION}/health/live", response_model=Health)
    async def live(self) -> Health:
        """The ingress answers (no model is asked)."""
        return Health(status="ok")

    @app.get(
        f"/{API_VERSION}/health/ready",
        response_model=Health,
        responses={401: {"model": ErrorResponse}, 503: {"model": Health}},  # 401: behind the key
    )
    async def ready(self) -> Any:
        """Both model deployments answer within 10 s."""

        async def both() -> ModelInfo:
            model = await self.model_info()
            await self.masks.ready.remote()
            return model

        try:
            model = await asyncio.wait_for(both(), timeout=10)
        except Exception as error:  # a deployment that cannot answer: not ready, say why
            detail = f"a model deployment did not answer ({type(error).__name__})"
            return JSONResponse(Health(status="not ready", detail=detail).model_dump(), status_code=503)
        return Health(status="ready", model=model)

    @app.get(f"/{API_VERSION}/info", response_model=ServerInfo, responses=_ERRORS)
    async def info(self) -> ServerInfo:
        """The model and the limits on what a request may bring."""
        s = self.settings
        limits = Limits(
            max_upload_mb=s.max_upload_mb,
            max_frames=s.max_frames,
            max_duration_s=s.max_duration_s,
            max_side=s.max_side,
            max_query_chars=s.max_query_chars,
            max_policy_frames=s.max_policy_frames,
            default_num_frames=self.cfg.data.eval_num_frames,
            api_key_required=bool(app.state.guard.api_key),
        )
        return ServerInfo(model=await self.model_info(), limits=limits)

    # ---- segmentation ----

    @app.post(f"/{API_VERSION}/segment", response_model=SegmentResponse, responses=_ERRORS)
    async def segment(self, body: SegmentRequest, request: Request) -> SegmentResponse:
        """Segment a video given as a URL or as frames."""
        video, read_s = await self._video_of_body(body)
        return await self._respond(request, body, body.query, video, read_s)

    @app.post(f"/{API_VERSION}/segment/upload", response_model=SegmentResponse, responses=_ERRORS)
    async def segment_upload(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="the video file (.mp4 or any format FFmpeg reads)")],
        query: Annotated[str, Form(min_length=1)],
        num_frames: Annotated[int | None, Form(ge=1)] = None,
        masks: Annotated[Literal["rle", "none"], Form()] = "rle",
        overlay: Annotated[bool, Form()] = False,
        reasoning: Annotated[bool, Form()] = True,
    ) -> SegmentResponse:
        """Segment an uploaded video (multipart/form-data)."""
        options = SegmentOptions(num_frames=num_frames, masks=masks, overlay=overlay, reasoning=reasoning)
        video, read_s = await self._video_of_upload(file, query, options)
        return await self._respond(request, options, query, video, read_s)

    @app.post(
        f"/{API_VERSION}/segment/stream",
        responses={200: {"content": {"application/x-ndjson": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def segment_stream(self, body: SegmentRequest, request: Request) -> StreamingResponse:
        """As /segment, streamed as NDJSON: an `answer` line, a `mask` line per frame as SAM2 tracks it, and
        a `done` line (or an `error` line if the model fails after the stream began)."""
        video, read_s = await self._video_of_body(body)
        return await self._stream(request, body, body.query, video, read_s)

    @app.post(
        f"/{API_VERSION}/segment/upload/stream",
        responses={200: {"content": {"application/x-ndjson": {}}}, **_ERRORS},
        response_class=StreamingResponse,
    )
    async def segment_upload_stream(
        self,
        request: Request,
        file: Annotated[UploadFile, File(description="the video file (.mp4 or any format FFmpeg reads)")],
        query: Annotated[str, Form(min_length=1)],
        num_frames: Annotated[int | None, Form(ge=1)] = None,
        reasoning: Annotated[bool, Form()] = True,
    ) -> StreamingResponse:
        """As /segment/upload, streamed as /segment/stream is."""
        options = SegmentOptions(num_frames=num_frames, masks="rle", overlay=False, reasoning=reasoning)
        video, read_s = await self._video_of_upload(file, query, options)
        return await self._stream(request, options, query, video, read_s)

    # ---- the steps ----

    def _check_request(self, query: str, options: SegmentOptions) -> None:
        """Fail fast, before the video is read, on what needs no video."""
        if not query.strip():
            raise RequestError(
                422, "query", "empty: say what to segment, e.g. 'the dog that is about to jump'"
            )
        if len(query) > self.settings.max_query_chars:
            raise RequestError(
                422,
                "query",
                f"{len(query)} characters, more than the {self.settings.max_query_chars} allowed",
            )
        num_frames = options.num_frames or self.cfg.data.eval_num_frames
        if num_frames > self.settings.max_policy_frames:
            raise RequestError(
                422, "num_frames", f"{num_frames}, more than the {self.settings.max_policy_frames} allowed"
            )

    async def _video_of_body(self, body: SegmentRequest) -> tuple[WholeVideo, float]:
        self._check_request(body.query, body)
        if (body.video_url is None) == (body.frames is None):
            raise RequestError(422, "video_url", "give the video as exactly one of video_url or frames")
        started = time.perf_counter()
        if body.frames is not None:
            video = await asyncio.to_thread(video_from_frames, body.frames, body.fps, self.settings)
        else:
            with request_workdir() as folder:
                video = await asyncio.to_thread(
                    video_from_url, body.video_url, Path(folder), self.settings, self.cfg.storage
                )
        if body.fps and video.fps is None:
            video = WholeVideo(video.uri, video.frames, video.frame_names, body.fps)
        return video, time.perf_counter() - started

    async def _video_of_upload(
        self, file: UploadFile, query: str, options: SegmentOptions
    ) -> tuple[WholeVideo, float]:
        self._check_request(query, options)
        started = time.perf_counter()
        with request_workdir() as folder:
            path = Path(folder) / "upload"
            with path.open("wb") as out:
                await asyncio.to_thread(shutil.copyfileobj, file.file, out, 1 << 20)
            check_size(path.stat().st_size, "file", self.settings)
            name = Path(file.filename or "upload").name
            video = await asyncio.to_thread(video_from_upload, path, name, self.settings)
        return video, time.perf_counter() - started

    async def _answer(
        self, request: Request, options: SegmentOptions, query: str, video: WholeVideo
    ) -> tuple[PolicyInput, LocatedAnswer, dict[str, float]]:
        """The policy's answer on the video (policy_input -> policy deployment -> locate_answer)."""
        frames = video.frames
        num_frames = options.num_frames or self.cfg.data.eval_num_frames  # checked before the video was read
        try:
            check_answer_budget(self.cfg.inference, len(frames) - 1)
        except ValueError:
            raise RequestError(
                422, "video", f"{len(frames)} frames: too many for this server's answer budget"
            ) from None
        request.state.log = f", {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}"
        started = time.perf_counter()
        policy_in = await asyncio.to_thread(policy_input, frames, query, num_frames, self.cfg.data.frame_size)
        text = await self._call(self.policy.answer.remote(policy_in))
        located = locate_answer(text, len(frames), frames.shape[1], frames.shape[2])
        return policy_in, located, {"policy": time.perf_counter() - started}

    async def _call(self, response) -> Any:
        """A deployment call under the request deadline (cancelled when it passes)."""
        try:
            return await asyncio.wait_for(response, self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise

    def _answer_fields(
        self, request: Request, model: ModelInfo, options: SegmentOptions, video: WholeVideo, result
    ) -> dict[str, Any]:
        return {
            "request_id": request_id(request),
            "model": model,
            "query": result.query,
            "video": VideoInfo(
                frames=len(video.frames),
                height=int(video.frames.shape[1]),
                width=int(video.frames.shape[2]),
                fps=video.fps,
            ),
            "frame_indices": list(result.frame_indices),
            "keyframe": result.keyframe,
            "boxes": np.round(result.boxes.astype(np.float64), 2).tolist(),
            "reasoning": result.reasoning if options.reasoning else None,
            "answer": result.answer if options.reasoning else None,
            "empty_reason": result.empty_reason,
        }

    async def _guarded(self, request: Request, work) -> Any:
        """`work` awaited; a model error (or a missed deadline) becomes a 5xx naming the request id, and the
        replica goes on serving. A RequestError is the client's: it stays a 4xx."""
        try:
            return await work
        except RequestError:
            raise
        except asyncio.TimeoutError:
            return self._model_error(request, 504, "the model did not answer within the deadline")
        except Exception as error:  # a model or encoding error
            return self._model_error(request, 500, f"the model failed ({type(error).__name__})", error)

    async def _respond(
        self, request: Request, options: SegmentOptions, query: str, video: WholeVideo, read_s: float
    ) -> Any:
        return await self._guarded(request, self._segment(request, options, query, video, read_s))

    async def _segment(
        self, request: Request, options: SegmentOptions, query: str, video: WholeVideo, read_s: float
    ) -> SegmentResponse:
        started = time.perf_counter() - read_s
        model = await self.model_info()
        policy_in, located, seconds = await self._answer(request, options, query, video)
        clock = time.perf_counter()
        packed, shape = await self._call(self.masks.propagate.remote(video.frames, located))
        seconds["propagate"] = time.perf_counter() - clock
        clock = time.perf_counter()
        loop = asyncio.get_running_loop()
        masks = await loop.run_in_executor(self.encoders, unbitpack_masks, packed, shape)
        result = VideoSegmentation.of(policy_in, located, masks, seconds)
        encoded = (
            await loop.run_in_executor(self.encoders, frame_masks, masks) if options.masks == "rle" else None
        )
        fps = video.fps or self.settings.default_fps
        overlay = (
            await loop.run_in_executor(self.encoders, overlay_mp4, video, result, fps)
            if options.overlay
            else None
        )
        seconds = {"read": read_s, **seconds, "encode": time.perf_counter() - clock}
        seconds["total"] = time.perf_counter() - started
        return SegmentResponse(
            **self._answer_fields(request, model, options, video, result),
            masks=[FrameMask(**m) for m in encoded] if encoded is not None else None,
            mask_frames_nonempty=int(masks.reshape(len(masks), -1).any(axis=1).sum()),
            overlay_mp4=overlay,
            seconds={k: round(v, 4) for k, v in seconds.items()},
        )

    def _model_error(
        self, request: Request, status: int, message: str, error: Exception | None = None
    ) -> JSONResponse:
        logger.error(
            "request %s failed: %s%s", request_id(request), message, f": {error!r}"[:500] if error else ""
        )
        return error_response(request, status, None, f"{message}; request id {request_id(request)}")

    async def _stream(
        self, request: Request, options: SegmentOptions, query: str, video: WholeVideo, read_s: float
    ) -> Any:
        started = time.perf_counter() - read_s

        async def answered() -> tuple:
            return await self.model_info(), *(await self._answer(request, options, query, video))

        outcome = await self._guarded(request, answered())
        if isinstance(outcome, JSONResponse):
            return outcome
        model, policy_in, located, seconds = outcome
        empty = np.zeros((0, *video.frames.shape[1:3]), dtype=bool)
        result = VideoSegmentation.of(policy_in, located, empty, seconds)
        head = StreamAnswer(**self._answer_fields(request, model, options, video, result))

        async def lines():
            yield head.model_dump_json() + "\n"
            clock = time.perf_counter()
            deadline = clock + self.settings.request_timeout_s
            count = 0
            loop = asyncio.get_running_loop()
            frames = self.masks.options(stream=True).propagate_frames.remote(video.frames, located)
            try:
                while True:
                    try:
                        position, packed, shape = await asyncio.wait_for(
                            frames.__anext__(), max(0.0, deadline - time.perf_counter())
                        )
                    except StopAsyncIteration:
                        break
                    mask = unbitpack_masks(packed, shape)
                    rle = await loop.run_in_executor(self.encoders, encode_mask, mask)
                    yield StreamMask(frame=int(position), **rle).model_dump_json() + "\n"
                    count += 1
                seconds["propagate"] = time.perf_counter() - clock
                seconds.update(read=read_s, total=time.perf_counter() - started)
                done = StreamDone(mask_frames=count, seconds={k: round(v, 4) for k, v in seconds.items()})
                yield done.model_dump_json() + "\n"
            except Exception as error:  # the stream has begun: the error is its last line
                frames.cancel()
                status = 504 if isinstance(error, asyncio.TimeoutError) else 500
                logger.error(
                    "request %s stream failed after %d frames: %r", request_id(request), count, error
                )
                message = f"the model failed after {count} frames ({type(error).__name__})"
                yield StreamError(
                    status=status, message=message, request_id=request_id(request)
                ).model_dump_json()
                yield "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")
