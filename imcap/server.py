"""The HTTP API and the web page, over the Python API: `imcap serve RUN_DIR`.

    POST /v1/captions   multipart: one or more `images` + options -> captions with scores and tokens, the
                        n-best list, and on request per-word attention grids and heat-map overlays (PNG)
    GET  /v1/model      vocabulary size, encoder, training data, validation metrics, request limits
    GET  /healthz       liveness and the state of the captioning queue
    GET  /              the web page (imcap/web/: plain HTML/CSS/JS, nothing from the internet)
    GET  /openapi.json  the schema of all of this

The model is loaded once, on its device (`imcap serve --device`, default auto: CUDA when torch sees it), and
checked there by captioning a blank image (`self_check`): a checkpoint that cannot caption never starts a
server. Captioning runs in a pool of `max_concurrency` worker threads (images are decoded on the CPU there, the
CNN and the search run on the device), at most `max_queue` requests wait for a worker, and any more get 503
with Retry-After.

What one request may ask for is bounded before any work is done (`Limits`, also in GET /v1/model): its cost,
images x beam_size x max_length, at most `max_cost`; overlays for at most `max_overlay_images` images and at
most `max_overlays` PNGs, counted as images x n_best x (max_length + 1); and a reply of at most
`max_reply_bytes`, estimated from the options (`reply_bytes`). Retry-After is the cost of the work queued
ahead times the measured seconds per cost unit, shared by the workers, at most `max_retry_after`.

Errors are JSON, `{"error": "one-line message"}`: 413 for a request body over `max_upload_bytes` (counted
while reading, not taken from Content-Length), 422 for an option out of range or a request over one of the
limits above, 415 for a file that is not an image, 422 for an image that cannot be used (corrupt, truncated,
decompression bomb, or any failure while captioning it or drawing its overlays), 503 when the queue is full.
With several images the good ones are captioned: the response is 200 and a bad image gets an entry with
`error` and its `status`; only when every image is bad is the whole request refused (415 when none is a
recognised image format, else 422). The server never opens a path named by a request.

Over 400 lines: the HTTP schema, the request limits and queue, and the page's routes are one service; the
captioning itself is the Python API's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from . import __version__
from .api import Captioner
from .captions import Caption, DecodingOptions
from .ensemble import member_names
from .checkpoint import CheckpointError
from .devices import describe
from .images import ImageError, open_image
from .limits import MAX_BEAM_SIZE, MAX_LENGTH, MAX_LENGTH_PENALTY
from .visualize import fit_square, heatmap_overlay

WEB_DIR = Path(__file__).parent / "web"
OVERLAY_SIDE = 160  # overlays are drawn on the image fitted in OVERLAY_SIDE x OVERLAY_SIDE pixels
# Reply size, estimated from the options before captioning (reply_bytes); generous, so the estimate is an upper bound.
OVERLAY_BYTES = 4 * OVERLAY_SIDE**2  # one overlay's data URL at most: an RGB PNG (<= 3 bytes a pixel) in base64 (x 4/3)
ATTENTION_VALUE_BYTES = 7  # one attention number in the JSON: "0.1234,"
WORD_BYTES = 80  # one word of a candidate: in `tokens`, in `caption`, and its share of the candidate's fields
IMAGE_BYTES = 512  # one image's entry without its candidates (file name, size, ...), and its share of the rest
MAX_RETRY_AFTER = 60  # seconds; a client that retries then gets a fresh estimate
NOT_AN_IMAGE = "not a recognised image format"  # what images.open_image says of a non-image: 415, not 422
# The page loads only its own files; images are blob: URLs of the user's files, overlays data: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ response models


class ErrorResponse(BaseModel):
    error: str = Field(description="what went wrong, in one line")
    results: list[ImageResult] | None = Field(None, description="per-image errors, when every image was refused")


class CaptionOptions(BaseModel):
    beam_size: int = Field(description="beam width (1 = greedy)")
    n_best: int = Field(description="captions returned per image, best first")
    max_length: int = Field(description="maximum words per caption")
    length_penalty: float = Field(description="GNMT length penalty exponent (0: none)")
    no_repeat_ngram: int = Field(0, description="n >= 2: no run of n words appears twice in a caption (0: off)")
    attention: bool = Field(description="attention grids included")
    overlays: bool = Field(description="heat-map overlay images included")

    def search(self) -> DecodingOptions:
        """The search settings of these options (the request's, already within the limits)."""
        return DecodingOptions(self.beam_size, self.max_length, self.length_penalty, self.n_best,
                               no_repeat_ngram=self.no_repeat_ngram)


class Candidate(BaseModel):
    caption: str = Field(description="the caption as text")
    tokens: list[str] = Field(description="its words, without <end>")
    score: float = Field(description="length-penalised log probability: what candidates are ranked by")
    log_prob: float = Field(description="sum of the words' log probabilities")
    finished: bool = Field(description="false when the caption hit max_length without <end>")
    attention: list[list[list[float]]] | None = Field(
        None, description="(T, h, w): attention[t] is where the model looked when it emitted tokens[t]; a "
                          "finished caption has one more map, for <end>. Each map sums to 1 over the grid, "
                          "which covers the whole image (resized, not cropped). Only with attention=true.")
    overlays: list[str] | None = Field(
        None, description="one PNG data URL per attention map: the image with the map drawn over it "
                          "(inferno colours). Only with overlays=true.")


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str = Field(description="the upload's file name (used in messages only)")
    status: int = Field(200, description="200, or 415 / 422 for an image that could not be read")
    error: str | None = Field(None, description="why the image could not be captioned")
    width: int | None = Field(None, description="image width in pixels, after EXIF rotation")
    height: int | None = Field(None, description="image height in pixels, after EXIF rotation")
    caption: str | None = Field(None, description="the best caption (= captions[0].caption)")
    captions: list[Candidate] = Field(default_factory=list, description="the n-best list, best first")


class CaptionsResponse(BaseModel):
    options: CaptionOptions
    grid: tuple[int, int] = Field(description="(h, w) of the attention grids")
    seconds: float = Field(description="time from the upload's arrival to the answer (queue wait included)")
    results: list[ImageResult] = Field(description="one entry per image, in request order")


class EncoderInfo(BaseModel):
    name: str
    image_size: int = Field(description="the encoder's square input side in pixels")
    grid: tuple[int, int] = Field(description="(h, w) annotation grid = attention grid")
    feature_dim: int
    pretrained: bool


class Limits(BaseModel):
    max_upload_bytes: int = Field(description="largest request body (all images together)")
    max_images: int = Field(description="images per request")
    max_beam_size: int
    max_length: int
    max_cost: int = Field(description="cost budget of one request: images x beam_size x max_length must not exceed it")
    max_overlay_images: int = Field(description="images per request with overlays=true")
    max_overlays: int = Field(description="overlay PNGs per reply, counted before captioning as "
                                          "images x n_best x (max_length + 1)")
    overlay_side: int = Field(description="overlays fit in overlay_side x overlay_side pixels")
    max_reply_bytes: int = Field(description="largest reply, estimated before captioning from the options: attention "
                                             "numbers, overlays and words at their largest")
    max_concurrency: int = Field(description="requests captioned at the same time")
    max_queue: int = Field(description="requests that may wait; more get 503")
    max_retry_after: int = Field(description="largest Retry-After, in seconds, of a 503")


class ModelInfo(BaseModel):
    name: str = Field(description="the run's name (its directory)")
    vocab_size: int
    language: str
    encoder: EncoderInfo
    decoder: dict[str, Any] = Field(description="the model config saved in the checkpoint")
    training_data: dict[str, Any] = Field(description="dataset format, feature store and data folder name")
    epochs: int | None = Field(None, description="epochs trained")
    metrics: dict[str, float | None] = Field(description="validation scores of this checkpoint (0-1; CIDEr ~0-10)")
    limits: Limits
    device: str = Field(description="where the model runs: cpu, cuda:0, mps, ...")
    device_name: str = Field(description="the device in words, e.g. cuda:0 (NVIDIA H200) or cpu (2 threads)")
    precision: str = Field(description="of the search: fp32, bf16 or fp16 (autocast)")
    encoder_precision: str = Field(description="of the CNN: fp32, bf16 or fp16")
    version: str = Field(description="imcap version")


class Health(BaseModel):
    status: str
    running: int = Field(description="requests being captioned now")
    waiting: int = Field(description="requests waiting for a worker")


ErrorResponse.model_rebuild()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "request body over the upload limit"},
    415: {"model": ErrorResponse, "description": "no uploaded file is a recognised image format"},
    422: {"model": ErrorResponse, "description": "an option out of range, no images, a request over the cost budget "
                                                 "or the overlay or reply-size limits (GET /v1/model: limits), or no "
                                                 "usable image (corrupt, truncated, decompression bomb)"},
    503: {"model": ErrorResponse, "description": "queue full; the Retry-After header says when to retry"},
}


# --------------------------------------------------------------------------------------------- the queue


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class CaptionQueue:
    """At most `max_concurrency` jobs run at once, in worker threads; at most `max_queue` wait for one.

    Each job comes with its cost (request_cost); Retry-After is estimated from the cost queued ahead."""

    def __init__(self, max_concurrency: int, max_queue: int, max_retry_after: int = MAX_RETRY_AFTER):
        if max_concurrency < 1 or max_queue < 0 or max_retry_after < 1:
            raise ValueError(f"need max_concurrency >= 1, max_queue >= 0 and max_retry_after >= 1, got "
                             f"{max_concurrency}, {max_queue}, {max_retry_after}")
        self.max_concurrency, self.max_queue, self.max_retry_after = max_concurrency, max_queue, max_retry_after
        self.running = 0
        self.waiting = 0
        self.queued_cost = 0  # cost of the jobs running or waiting
        self.seconds_per_cost = 1e-3  # moving average of a job's seconds per cost unit (a guess until the first job)
        self._measured = False
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="imcap-caption")
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def retry_after(self) -> int:
        """Seconds until the work queued now is probably done: its cost x seconds per cost unit / workers, capped."""
        seconds = self.queued_cost * self.seconds_per_cost / self.max_concurrency
        return min(self.max_retry_after, max(1, math.ceil(seconds)))

    async def run(self, cost: int, fn: Callable[..., T], *args) -> T:
        """fn(*args) in a worker thread; QueueFull when max_queue requests are already waiting."""
        semaphore = self._semaphore_for_this_loop()
        if semaphore.locked() and self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        self.waiting += 1
        self.queued_cost += cost
        try:
            await semaphore.acquire()
        except BaseException:
            self.queued_cost -= cost
            raise
        finally:
            self.waiting -= 1
        self.running += 1
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.running -= 1
            self.queued_cost -= cost
            self._measure((time.perf_counter() - start) / max(cost, 1))
            semaphore.release()

    def _measure(self, seconds_per_cost: float) -> None:
        weight = 0.2 if self._measured else 1.0  # the first job replaces the guess
        self.seconds_per_cost += weight * (seconds_per_cost - self.seconds_per_cost)
        self._measured = True

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _semaphore_for_this_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # a test client may run each request in a new event loop
        if self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.max_concurrency)
        return self._semaphore


# ------------------------------------------------------------------------------------------- upload limit


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, by Content-Length or while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"upload too large: the limit is {self.limit:,} bytes per request (all images together)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(413, self.message())(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # chunked, or a Content-Length that lied
                    raise HTTPException(413, self.message())
            return message

        await self.app(scope, counting_receive, send)


# ---------------------------------------------------------------------------------------- request limits


def request_cost(n_images: int, options: CaptionOptions) -> int:
    """What a request costs the worker: images x beam_size x max_length (the beam steps to run at most)."""
    return n_images * options.beam_size * options.max_length


def overlay_count(n_images: int, options: CaptionOptions) -> int:
    """The most overlay PNGs a reply can hold: one per attention map of every candidate (<end> included)."""
    return n_images * options.n_best * (options.max_length + 1) if options.overlays else 0


def reply_bytes(n_images: int, options: CaptionOptions, grid: tuple[int, int]) -> int:
    """An upper estimate of the reply's size from the options alone: every candidate at max_length words."""
    maps = n_images * options.n_best * (options.max_length + 1)  # (T, h, w) per candidate, T <= max_length + 1
    attention = maps * grid[0] * grid[1] * ATTENTION_VALUE_BYTES if options.attention else 0
    return n_images * IMAGE_BYTES + maps * WORD_BYTES + attention + overlay_count(n_images, options) * OVERLAY_BYTES


def over_limits(n_images: int, options: CaptionOptions, limits: Limits, grid: tuple[int, int]) -> str | None:
    """Why a request of n_images with these options is refused before any work (one line), or None."""
    cost = request_cost(n_images, options)
    if cost > limits.max_cost:
        return (f"request too costly: {n_images} images x beam_size {options.beam_size} x max_length "
                f"{options.max_length} = {cost:,}, over the budget of {limits.max_cost:,}; send fewer images or "
                f"lower beam_size or max_length")
    if options.overlays and n_images > limits.max_overlay_images:
        return (f"overlays: at most {limits.max_overlay_images} images per request with overlays=true, got "
                f"{n_images}; send fewer images or set overlays=false")
    overlays = overlay_count(n_images, options)
    if overlays > limits.max_overlays:
        return (f"overlays: up to {n_images} images x n_best {options.n_best} x (max_length {options.max_length} + 1)"
                f" = {overlays:,} overlay images, over the limit of {limits.max_overlays:,}; lower n_best or "
                f"max_length, send fewer images, or set overlays=false")
    size = reply_bytes(n_images, options, grid)
    if size > limits.max_reply_bytes:
        return (f"reply too large: up to {size:,} bytes estimated, over the limit of {limits.max_reply_bytes:,}; "
                f"lower n_best or max_length, send fewer images, or set attention or overlays to false")
    return None


# ------------------------------------------------------------------------------------------ captioning job


def caption_uploads(captioner: Captioner, uploads: list[tuple[str, bytes]], options: CaptionOptions) -> list[ImageResult]:
    """Decode the uploaded files and caption the ones that are images (runs in a worker thread). An image that
    fails at any stage (decoding, captioning, drawing its overlays) gets its own entry with `error`, status 422
    (415 if it is no image); the others are answered."""
    results: list[ImageResult | None] = [None] * len(uploads)
    images: dict[int, Image.Image] = {}
    for i, (name, data) in enumerate(uploads):
        try:
            images[i] = open_image(io.BytesIO(data), name)
        except ImageError as e:
            results[i] = ImageResult(index=i, filename=name, status=_image_error_status(str(e)), error=str(e))
        except Exception as e:  # noqa: BLE001 - not expected (open_image says ImageError), and this image's alone
            results[i] = _failure(i, name, "cannot decode it", e)
    for i, caption in _caption_all(captioner, images, options).items():
        name = uploads[i][0]
        if isinstance(caption, Exception):
            results[i] = _failure(i, name, "cannot caption it", caption)
            continue
        try:
            results[i] = _image_result(i, name, images[i], caption, options)
        except Exception as e:  # noqa: BLE001 - drawing its overlays failed: this image only
            results[i] = _failure(i, name, "cannot draw its attention overlays", e)
    return results


def _caption_all(captioner: Captioner, images: dict[int, Image.Image],
                 options: CaptionOptions) -> dict[int, Caption | Exception]:
    """Caption the images as one batch; if that raises, one by one, so that an image that breaks it fails alone."""
    def caption(batch: list[Image.Image]) -> list[Caption]:
        return captioner.caption(batch, options=options.search())

    if not images:
        return {}
    try:
        return dict(zip(images, caption(list(images.values()))))
    except Exception as e:  # noqa: BLE001 - reported per image
        if len(images) == 1:
            return {i: e for i in images}
    results: dict[int, Caption | Exception] = {}
    for i, image in images.items():
        try:
            [results[i]] = caption([image])
        except Exception as e:  # noqa: BLE001 - reported per image
            results[i] = e
    return results


def _failure(index: int, name: str, what: str, e: Exception) -> ImageResult:
    detail = (str(e).splitlines() or [""])[0][:200]
    return ImageResult(index=index, filename=name, status=422,
                       error=f"{name}: {what} ({type(e).__name__}{': ' + detail if detail else ''})")


def _image_error_status(message: str) -> int:
    return 415 if NOT_AN_IMAGE in message else 422


def _image_result(index: int, name: str, image: Image.Image, best: Caption, options: CaptionOptions) -> ImageResult:
    if best.error is not None:  # open_image already decoded it, so this is not expected
        return ImageResult(index=index, filename=name, status=422, error=best.error)
    small = fit_square(image, OVERLAY_SIDE) if options.overlays else None
    candidates = [_candidate(c, small, options) for c in [best, *best.alternatives]]
    return ImageResult(index=index, filename=name, width=image.width, height=image.height,
                       caption=best.caption, captions=candidates)


def _candidate(c: Caption, small: Image.Image | None, options: CaptionOptions) -> Candidate:
    alphas = c.alphas if c.alphas is not None else np.zeros((0, 1, 1), np.float32)  # (T, h, w)
    return Candidate(
        caption=c.caption, tokens=c.tokens, score=round(c.score, 4), log_prob=round(c.log_prob, 4),
        finished=c.finished,
        attention=np.round(alphas.astype(np.float64), 4).tolist() if options.attention else None,
        overlays=[_png_data_url(heatmap_overlay(small, a)) for a in alphas] if small is not None else None,
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _png_data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode("ascii")


def _safe_name(filename: str | None, index: int) -> str:
    """The last component of an upload's file name, printable and short; it is only ever shown."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120]
    return name or f"<image {index}>"


# ---------------------------------------------------------------------------------------------- self-check

# Every code path of a reply: beam search, an n-best list, attention grids and overlays.
SELF_CHECK = CaptionOptions(beam_size=2, n_best=2, max_length=4, length_penalty=0.0, attention=True, overlays=True)


def self_check(captioner: Captioner) -> None:
    """Caption a small blank image as a request would; CheckpointError, naming the checkpoint, if that fails or
    gives a reply that is not valid JSON (NaN scores), so that a model that cannot caption is never served."""
    name = "blank.png"
    [result] = caption_uploads(captioner, [(name, _png_bytes(Image.new("RGB", (48, 32), (127, 127, 127))))], SELF_CHECK)
    problem = result.error and result.error.removeprefix(f"{name}: ")
    if problem is None:
        try:
            json.dumps(result.model_dump(), allow_nan=False)
        except ValueError as e:
            problem = f"its reply is not valid JSON ({e})"
    if problem is not None:
        raise CheckpointError(f"{captioner.meta.get('path', 'model')}: self-check on a blank image failed: {problem}")


# ---------------------------------------------------------------------------------------------- metadata


def model_info(captioner: Captioner, limits: Limits) -> ModelInfo:
    meta, spec = captioner.meta, captioner.encoder_spec
    data = meta.get("data") or {}
    progress = meta.get("progress") or {}
    name = " + ".join(member_names(meta.get("ensemble", [meta.get("path", "model")])))
    return ModelInfo(
        name=name or "model",
        vocab_size=len(captioner.vocab),
        language=meta.get("language", "en"),
        encoder=EncoderInfo(name=spec.name, image_size=spec.image_size, grid=spec.grid,
                            feature_dim=spec.feature_dim, pretrained=spec.weights != "random"),
        decoder=captioner.model.config.to_dict(),
        training_data={"format": data.get("format"), "features": data.get("features"),
                       "name": Path(data["data_dir"]).name if data.get("data_dir") else None},
        epochs=progress.get("epoch"),
        metrics={k: (round(v, 4) if isinstance(v, (int, float)) else None) for k, v in (meta.get("metrics") or {}).items()},
        limits=limits,
        device=str(captioner.device),
        device_name=describe(captioner.device),
        precision=captioner.precision,
        encoder_precision=captioner.encoder_precision,
        version=__version__,
    )


# -------------------------------------------------------------------------------------------------- errors


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    """One line naming each bad field: "beam_size: Input should be less than or equal to 10"."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
        field = loc[0] if loc else "request"
        if field == "images" and err.get("type") == "missing":
            parts.append("images: none sent; send one or more files in the multipart form field 'images'")
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"not found: {request.url.path}"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, f"server busy: too many requests waiting; retry in {exc.retry_after} s",
                      headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: uvicorn logs the traceback
        return _error(500, "internal server error")


# -------------------------------------------------------------------------------------------------- the app


def create_app(captioner: Captioner, *, max_upload_bytes: int = 10_000_000, max_concurrency: int = 1,
               max_queue: int = 16, max_images: int = 16, max_cost: int = 2_400, max_overlay_images: int = 4,
               max_overlays: int = 128, max_reply_bytes: int = 16_000_000,
               max_retry_after: int = MAX_RETRY_AFTER) -> FastAPI:
    """The FastAPI app serving `captioner`. Its encoder is built now, so the first request is not slow, and a
    blank image is captioned (self_check): CheckpointError if the model cannot caption.

    max_cost: the budget of images x beam_size x max_length per request (the default, 2,400, takes 16 images at
    the default beam 3 and length 30, or 4 at the largest beam and length)."""
    if max_cost < 1 or max_reply_bytes < 1 or max_overlay_images < 0 or max_overlays < 0:
        raise ValueError(f"need max_cost >= 1, max_reply_bytes >= 1, max_overlay_images >= 0 and max_overlays >= 0, "
                         f"got {max_cost}, {max_reply_bytes}, {max_overlay_images}, {max_overlays}")
    limits = Limits(max_upload_bytes=max_upload_bytes, max_images=max_images, max_beam_size=MAX_BEAM_SIZE,
                    max_length=MAX_LENGTH, max_cost=max_cost, max_overlay_images=max_overlay_images,
                    max_overlays=max_overlays, overlay_side=OVERLAY_SIDE, max_reply_bytes=max_reply_bytes,
                    max_concurrency=max_concurrency, max_queue=max_queue, max_retry_after=max_retry_after)
    queue = CaptionQueue(max_concurrency, max_queue, max_retry_after)
    captioner.encoder  # noqa: B018 - build the CNN once, at start-up
    self_check(captioner)
    info = model_info(captioner, limits)
    grid = captioner.encoder_spec.grid

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="imcap", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Show, Attend and Tell image captioning: captions, n-best lists and per-word "
                              "attention maps. Errors are JSON objects with an `error` message. A request costs "
                              "images x beam_size x max_length, at most `limits.max_cost` (GET /v1/model); overlays "
                              "are drawn for at most `limits.max_overlay_images` images and `limits.max_overlays` "
                              "PNGs (images x n_best x (max_length + 1)); the reply, estimated from the options, "
                              "is at most `limits.max_reply_bytes`. Over any of these: 422, before any work.")
    app.state.captioner, app.state.queue, app.state.info = captioner, queue, info
    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    _install_error_handlers(app)

    @app.post("/v1/captions", response_model=CaptionsResponse, responses=ERROR_RESPONSES, tags=["captions"])
    async def post_captions(
        images: Annotated[list[UploadFile], File(description="one or more image files (JPEG, PNG, WebP, ...)")],
        beam_size: Annotated[int, Form(ge=1, le=MAX_BEAM_SIZE, description="beam width (1 = greedy)")] = 3,
        n_best: Annotated[int, Form(ge=1, le=MAX_BEAM_SIZE, description="captions per image (<= beam_size)")] = 1,
        max_length: Annotated[int, Form(ge=1, le=MAX_LENGTH, description="maximum words per caption")] = 30,
        length_penalty: Annotated[float, Form(ge=0, le=MAX_LENGTH_PENALTY, description="GNMT length penalty exponent")] = 0.0,
        no_repeat_ngram: Annotated[int, Form(ge=0, le=MAX_LENGTH, description="n >= 2: no run of n words twice in "
                                             "a caption (0: off)")] = 0,
        attention: Annotated[bool, Form(description="include the per-word attention grids (numbers)")] = False,
        overlays: Annotated[bool, Form(description="include per-word heat-map overlays (PNG data URLs)")] = False,
    ) -> CaptionsResponse | JSONResponse:
        """Caption each uploaded image. A bad image among good ones gets an `error` entry (status 200);
        when every image is bad the request fails with 415 (none is an image) or 422. 422 before any work for
        a request over the limits: images x beam_size x max_length over `max_cost`, overlays for more than
        `max_overlay_images` images or more than `max_overlays` PNGs, an estimated reply over `max_reply_bytes`."""
        if n_best > beam_size:
            raise HTTPException(422, f"n_best: must be at most beam_size ({beam_size}), got {n_best}")
        if no_repeat_ngram == 1:
            raise HTTPException(422, f"no_repeat_ngram: must be 0 (off) or from 2 to {MAX_LENGTH}, got 1")
        if len(images) > max_images:
            raise HTTPException(422, f"images: too many ({len(images)}); at most {max_images} per request")
        options = CaptionOptions(beam_size=beam_size, n_best=n_best, max_length=max_length, length_penalty=length_penalty,
                                 no_repeat_ngram=no_repeat_ngram, attention=attention, overlays=overlays)
        refusal = over_limits(len(images), options, limits, grid)
        if refusal is not None:
            raise HTTPException(422, refusal)
        uploads = [(_safe_name(f.filename, i), await f.read()) for i, f in enumerate(images)]
        start = time.perf_counter()
        results = await queue.run(request_cost(len(uploads), options), caption_uploads, captioner, uploads, options)
        if all(r.error is not None for r in results):
            statuses = {r.status for r in results}
            status = statuses.pop() if len(statuses) == 1 else 422
            message = results[0].error if len(results) == 1 else "no image could be captioned: " + "; ".join(r.error for r in results)
            return _error(status, message, results=[r.model_dump() for r in results])
        return CaptionsResponse(options=options, grid=grid,
                                seconds=round(time.perf_counter() - start, 4), results=results)

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"])
    async def get_model() -> ModelInfo:
        """What is being served: vocabulary, encoder, training data, validation metrics, limits."""
        return info

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        return Health(status="ok", running=queue.running, waiting=queue.waiting)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          device: str | Any = "auto", precision: str = "auto", **limits: int) -> None:
    """Load RUN_DIR once on `device` (Captioner.load's device and precision), check that it captions there, and
    serve the API and the page with uvicorn until interrupted.

    limits: create_app's keyword arguments (max_upload_bytes, max_concurrency, max_queue, max_images, max_cost,
    max_overlay_images, max_overlays, max_reply_bytes, max_retry_after). CheckpointError, before listening,
    for a checkpoint that does not load or cannot caption a blank image."""
    import uvicorn

    captioner = Captioner.load(run_dir, device=device, precision=precision)
    app = create_app(captioner, **limits)
    info = app.state.info
    print(f"imcap: serving {info.name} ({info.encoder.name}, {info.vocab_size} words) on {info.device_name}, "
          f"{info.precision} at http://{host if ':' not in host else f'[{host}]'}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
