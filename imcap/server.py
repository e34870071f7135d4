"""The HTTP API and the web page, over the Python API: `imcap serve RUN_DIR`.

    POST /v1/captions   multipart: one or more `images` + options -> captions with scores and tokens, the
                        n-best list, and on request per-word attention grids and heat-map overlays (PNG)
    GET  /v1/model      vocabulary size, encoder, training data, validation metrics, request limits
    GET  /healthz       liveness and the state of the captioning queue
    GET  /              the web page (imcap/web/: plain HTML/CSS/JS, nothing from the internet)
    GET  /openapi.json  the schema of all of this

The model is loaded once. Captioning is CPU-bound: it runs in a pool of `max_concurrency` worker threads,
at most `max_queue` requests wait for a worker, and any more get 503 with Retry-After.

Errors are JSON, `{"error": "one-line message"}`: 413 for a request body over `max_upload_bytes` (counted
while reading, not taken from Content-Length), 422 for an option out of range, 415 for a file that is not
an image, 422 for an image that cannot be used (corrupt, truncated, decompression bomb), 503 when the
queue is full. With several images the good ones are captioned: the response is 200 and a bad image gets
an entry with `error` and its `status`; only when every image is bad is the whole request refused (415
when none is a recognised image format, else 422). The server never opens a path named by a request.
"""

from __future__ import annotations

import asyncio
import base64
import io
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
from PIL import Image, ImageOps
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from . import __version__
from .api import Caption, Captioner
from .images import ImageError, open_image
from .visualize import heatmap_overlay

WEB_DIR = Path(__file__).parent / "web"
MAX_BEAM_SIZE = 10  # beam search cost grows with K; 10 is past the point where captions improve
MAX_LENGTH = 60  # words per caption
MAX_LENGTH_PENALTY = 5.0
OVERLAY_SIDE = 256  # overlays are drawn on the image fitted in OVERLAY_SIDE x OVERLAY_SIDE pixels
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
    attention: bool = Field(description="attention grids included")
    overlays: bool = Field(description="heat-map overlay images included")


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
    max_concurrency: int = Field(description="requests captioned at the same time")
    max_queue: int = Field(description="requests that may wait; more get 503")


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
    version: str = Field(description="imcap version")


class Health(BaseModel):
    status: str
    running: int = Field(description="requests being captioned now")
    waiting: int = Field(description="requests waiting for a worker")


ErrorResponse.model_rebuild()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "request body over the upload limit"},
    415: {"model": ErrorResponse, "description": "no uploaded file is a recognised image format"},
    422: {"model": ErrorResponse, "description": "an option out of range, no images, or no usable image "
                                                 "(corrupt, truncated, decompression bomb)"},
    503: {"model": ErrorResponse, "description": "queue full; the Retry-After header says when to retry"},
}


# --------------------------------------------------------------------------------------------- the queue


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class CaptionQueue:
    """At most `max_concurrency` jobs run at once, in worker threads; at most `max_queue` wait for one."""

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"need max_concurrency >= 1 and max_queue >= 0, got {max_concurrency}, {max_queue}")
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.running = 0
        self.waiting = 0
        self.mean_seconds = 1.0  # moving average of a job's duration, for Retry-After
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="imcap-caption")
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained enough to take one more request."""
        return max(1, math.ceil((self.waiting + 1) * self.mean_seconds / self.max_concurrency))

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) in a worker thread; QueueFull when max_queue requests are already waiting."""
        semaphore = self._semaphore_for_this_loop()
        if semaphore.locked() and self.waiting >= self.max_queue:
            raise QueueFull(self.retry_after())
        self.waiting += 1
        try:
            await semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.running -= 1
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)
            semaphore.release()

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


# ------------------------------------------------------------------------------------------ captioning job


def caption_uploads(captioner: Captioner, uploads: list[tuple[str, bytes]], options: CaptionOptions) -> list[ImageResult]:
    """Decode the uploaded files and caption the ones that are images (runs in a worker thread)."""
    results: list[ImageResult | None] = [None] * len(uploads)
    images: dict[int, Image.Image] = {}
    for i, (name, data) in enumerate(uploads):
        try:
            images[i] = open_image(io.BytesIO(data), name)
        except ImageError as e:
            results[i] = ImageResult(index=i, filename=name, status=_image_error_status(str(e)), error=str(e))
    if images:
        captions = captioner.caption(list(images.values()), beam_size=options.beam_size, n_best=options.n_best,
                                     max_length=options.max_length, length_penalty=options.length_penalty)
        for (i, image), c in zip(images.items(), captions):
            results[i] = _image_result(i, uploads[i][0], image, c, options)
    return results


def _image_error_status(message: str) -> int:
    return 415 if NOT_AN_IMAGE in message else 422


def _image_result(index: int, name: str, image: Image.Image, best: Caption, options: CaptionOptions) -> ImageResult:
    if best.error is not None:  # open_image already decoded it, so this is not expected
        return ImageResult(index=index, filename=name, status=422, error=best.error)
    small = ImageOps.contain(image, (OVERLAY_SIDE, OVERLAY_SIDE), Image.BICUBIC) if options.overlays else None
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


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _safe_name(filename: str | None, index: int) -> str:
    """The last component of an upload's file name, printable and short; it is only ever shown."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120]
    return name or f"<image {index}>"


# ---------------------------------------------------------------------------------------------- metadata


def _run_name(checkpoint: Path) -> str:
    """runs/f8k/best -> f8k (a checkpoint directory inside its run), else the directory's own name."""
    return checkpoint.parent.name if checkpoint.name in ("best", "checkpoint", "best.old", "checkpoint.old") else checkpoint.name


def model_info(captioner: Captioner, limits: Limits) -> ModelInfo:
    meta, spec = captioner.meta, captioner.encoder_spec
    data = meta.get("data") or {}
    progress = meta.get("progress") or {}
    name = " + ".join(_run_name(Path(p)) for p in meta.get("ensemble", [meta.get("path", "model")]))
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
               max_queue: int = 16, max_images: int = 16) -> FastAPI:
    """The FastAPI app serving `captioner` (its encoder is built now, so the first request is not slow)."""
    captioner.encoder  # noqa: B018 - build the CNN once, at start-up
    queue = CaptionQueue(max_concurrency, max_queue)
    limits = Limits(max_upload_bytes=max_upload_bytes, max_images=max_images, max_beam_size=MAX_BEAM_SIZE,
                    max_length=MAX_LENGTH, max_concurrency=max_concurrency, max_queue=max_queue)
    info = model_info(captioner, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="imcap", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Show, Attend and Tell image captioning: captions, n-best lists and per-word "
                              "attention maps. Errors are JSON objects with an `error` message.")
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
        attention: Annotated[bool, Form(description="include the per-word attention grids (numbers)")] = False,
        overlays: Annotated[bool, Form(description="include per-word heat-map overlays (PNG data URLs)")] = False,
    ) -> CaptionsResponse | JSONResponse:
        """Caption each uploaded image. A bad image among good ones gets an `error` entry (status 200);
        when every image is bad the request fails with 415 (none is an image) or 422."""
        if n_best > beam_size:
            raise HTTPException(422, f"n_best: must be at most beam_size ({beam_size}), got {n_best}")
        if len(images) > max_images:
            raise HTTPException(422, f"images: too many ({len(images)}); at most {max_images} per request")
        options = CaptionOptions(beam_size=beam_size, n_best=n_best, max_length=max_length,
                                 length_penalty=length_penalty, attention=attention, overlays=overlays)
        uploads = [(_safe_name(f.filename, i), await f.read()) for i, f in enumerate(images)]
        start = time.perf_counter()
        results = await queue.run(caption_uploads, captioner, uploads, options)
        if all(r.error is not None for r in results):
            statuses = {r.status for r in results}
            status = statuses.pop() if len(statuses) == 1 else 422
            message = results[0].error if len(results) == 1 else "no image could be captioned: " + "; ".join(r.error for r in results)
            return _error(status, message, results=[r.model_dump() for r in results])
        return CaptionsResponse(options=options, grid=captioner.encoder_spec.grid,
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


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, max_upload_bytes: int = 10_000_000,
          max_concurrency: int = 1, max_queue: int = 16, log_level: str = "info") -> None:
    """Load RUN_DIR once and serve the API and the page with uvicorn until interrupted."""
    import uvicorn

    captioner = Captioner.load(run_dir)
    app = create_app(captioner, max_upload_bytes=max_upload_bytes, max_concurrency=max_concurrency,
                     max_queue=max_queue)
    info = app.state.info
    print(f"imcap: serving {info.name} ({info.encoder.name}, {info.vocab_size} words) "
          f"on http://{host if ':' not in host else f'[{host}]'}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
