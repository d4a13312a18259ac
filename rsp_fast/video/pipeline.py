"""Stream a video through RSP: decode, attribute and encode overlap in a three-stage pipeline.

A decoder thread fills a bounded queue with frame batches, the calling thread attributes
them (pictures.FrameAttributor), an encoder thread renders (overlay or side by side, label
drawn; the frames of a batch on a pool of threads) and encodes. Queues hold at most two
batches, so memory stays bounded whatever the video's length. The output keeps the input's
frame timestamps (or a rate given), aspect ratio and sound, and appears only when complete.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from .. import render
from ..api import RSP
from ..errors import RSPError
from ..models import checked_device
from ..paths import checked_output_file
from . import io
from ..pictures import FrameAttributor, FrameMaps, as_spec, explainer_on, positive_int

_DONE = object()
RUNNING_DECAY = 0.8  # --scale running: s_t = 0.8·s_{t-1} + 0.2·(this frame's scale)
# Frames are drawn by a pool of threads (NumPy and PIL release the GIL): on a GPU machine the
# CPU draws HD overlays, not the GPU's attribution, bound the throughput. Half the cores: the
# rest decode, attribute and encode (on this project's 2-core machine: one, as before).
RENDER_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class _Attributed:
    batch: io.DecodedBatch
    maps: FrameMaps
    seconds: float


class _Stage(threading.Thread):
    """A daemon thread whose exception is handed to the caller instead of being lost; it does
    nothing once ``stop`` is set (it may start after an interrupt that the caller already saw)."""

    def __init__(self, fn, stop: threading.Event):
        super().__init__(daemon=True)
        self.fn, self.stop, self.error, self.seconds = fn, stop, None, 0.0
        self.ended = threading.Event()

    def run(self):
        try:
            if not self.stop.is_set():
                self.fn(self)
        except BaseException as exc:  # re-raised in the calling thread
            self.error = exc
        finally:
            self.ended.set()

    def wait_to_end(self) -> None:
        """Wait until ``run`` has returned, if the thread was started. Not ``join``: in CPython
        3.11 a signal that interrupts ``join`` marks a running thread as ended (bpo-45274's
        fix), and the encoder was then closed while the writer still wrote to it (a crash)."""
        if self.ident is not None:
            self.ended.wait()


def _put(q: queue.Queue, item, stop: threading.Event, consumer: threading.Thread | None = None) -> bool:
    """Put unless stopped or the consumer died (so a failed stage never deadlocks the others)."""
    while not stop.is_set() and (consumer is None or consumer.is_alive()):
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event, worker: _Stage):
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set() or (worker is not None and not worker.is_alive()):
                return _DONE


def explain_video(model, src, dst, *, layer=None, init: str = "comparative", hostile_k: int = 3, target: int | None = None,
                  batch_size: int = 8, device: str = "cpu", backend: str | None = None, precision: str = "fp32", fps: float | None = None,
                  max_frames: int | None = None, mode: str = "overlay", scale: str = "frame", progress: bool | None = None,
                  explainer: RSP | None = None) -> dict:
    """Attribute every frame of ``src`` and write the heat-map video ``dst``; returns the report
    ``{"frames": [{"index", "time", "label", "name", "score", "target", "seconds"}], "totals": {...}}``."""
    if mode not in ("overlay", "side-by-side"):
        raise RSPError(f"mode must be 'overlay' or 'side-by-side', not {mode!r}")
    if scale not in ("frame", "running"):
        raise RSPError(f"scale must be 'frame' or 'running', not {scale!r}")
    positive_int(batch_size, "batch size")
    if max_frames is not None:
        positive_int(max_frames, "max frames")
    if fps is not None and (not isinstance(fps, (int, float)) or not 1 / 1001 <= fps <= 1000):  # NaN fails this too
        raise RSPError(f"frame rate must be from 1/1001 to 1000 frames per second (one frame in 1001 s at least), not {fps}")
    written = checked_output_file(dst, "output video", [("input video", src)])  # a link: its target
    device = checked_device(device)
    if precision == "tf32" and device.type != "cuda":
        raise RSPError("precision='tf32' uses CUDA tensor cores: use --device cuda, or fp32 or bf16")
    spec = as_spec(model)
    info = io.probe(src)  # fails here, before any model work, on a missing or broken file
    explainer = explainer_on(spec, device, explainer, layer=layer, init=init, hostile_k=hostile_k, backend=backend,
                             precision=precision)
    out_fps = Fraction(fps).limit_denominator(1001) if fps else info.fps
    total = min(info.frames, max_frames) if info.frames and max_frames else (max_frames or info.frames)
    # no stderr at all where fd 2 was closed at start-up (`2>&-`, a daemon): no bar to draw
    show = sys.stderr is not None and (sys.stderr.isatty() if progress is None else progress)

    stop = threading.Event()
    decoded: queue.Queue = queue.Queue(maxsize=2)
    attributed: queue.Queue = queue.Queue(maxsize=2)
    keep_times = fps is None  # the source's timestamps (variable frame rates stay in sync); --fps retimes
    attribute = FrameAttributor(spec, explainer, device, batch_size, target)  # checks target: before any file opens
    encoder = io.Encoder(written, out_fps, start=info.start, audio_from=src if keep_times else None)
    try:
        _check_frame_size(encoder, src, mode)
    except BaseException:
        encoder.abort()
        raise
    rows: list[dict] = []

    def decode(stage: _Stage):
        t = time.perf_counter()
        for batch in io.decode_batches(src, batch_size, max_frames):
            stage.seconds += time.perf_counter() - t
            if not _put(decoded, batch, stop):
                return
            t = time.perf_counter()
        _put(decoded, _DONE, stop)

    def picture(frame, heat, colour_scale, caption):
        drawn = render.overlay(frame, heat, colour_scale)
        return render.draw_label(render.side_by_side(frame, drawn) if mode == "side-by-side" else drawn, caption)

    def encode(stage: _Stage):
        running = None
        with ThreadPoolExecutor(RENDER_THREADS) as pool:
            while (item := _get(attributed, stop, None)) is not _DONE:
                t = time.perf_counter()
                shown = []  # each frame's colour scale: its own, or smoothed over the frames before it
                for s in pool.map(render.symmetric_scale, item.maps.heat):
                    running = s if running is None or scale == "frame" else RUNNING_DECAY * running + (1 - RUNNING_DECAY) * s
                    shown.append(running)
                captions = [f"{spec.label(c)} ({p:.2f})" for c, p in zip(item.maps.labels, item.maps.scores)]
                for k, drawn in enumerate(pool.map(picture, item.batch.frames, item.maps.heat, shown, captions)):
                    encoder.write(drawn, item.batch.times[k] if keep_times else None)
                stage.seconds += time.perf_counter() - t

    decoder, writer = _Stage(decode, stop), _Stage(encode, stop)
    started = time.perf_counter()
    attribute_s = 0.0
    try:
        decoder.start()
        writer.start()
        while (batch := _get(decoded, stop, decoder)) is not _DONE:
            t = time.perf_counter()
            maps = attribute(batch.frames)
            seconds = time.perf_counter() - t
            attribute_s += seconds
            if not _put(attributed, _Attributed(batch, maps, seconds), stop, writer):
                stop.set()  # the encoder failed: the decoder must not wait for room in its queue
                break
            for k, idx in enumerate(batch.indices):
                label = maps.labels[k]
                rows.append({"index": idx, "time": batch.times[k], "label": label, "name": spec.label(label),
                             "score": maps.scores[k], "target": maps.targets[k], "seconds": seconds / len(batch.indices)})
            if show:
                _progress(len(rows), total, time.perf_counter() - started)
        _put(attributed, _DONE, stop, writer)
        decoder.wait_to_end()
        writer.wait_to_end()
        for stage in (decoder, writer):
            if stage.error is not None:
                raise stage.error
        if not rows:
            raise RSPError(f"video {str(src)!r} has no frames")
        cut = max_frames is not None and len(rows) == max_frames  # the sound ends with the last frame shown
        encoder.commit(audio_until=encoder.end if cut else None)  # on the output's clock (an AVI's starts at frame 0)
    except BaseException:
        stop.set()

        def wind_down():
            for stage in (writer, decoder):  # each sees `stop` at its next batch; the writer must end before abort
                stage.wait_to_end()
            encoder.abort()
        _to_the_end(wind_down)
        raise
    finally:
        if show:
            sys.stderr.write("\n")
    wall = time.perf_counter() - started
    return {"frames": rows,
            "totals": {"frames": len(rows), "decode_s": decoder.seconds, "attribute_s": attribute_s,
                       "encode_s": writer.seconds, "wall_s": wall, "fps": len(rows) / wall if wall else 0.0},
            "model": spec.name, "layer": explainer.layer, "init": explainer.init, "batch_size": batch_size,
            "device": str(device), "output": str(dst), "output_fps": float(out_fps),
            "audio": encoder.audio_note if keep_times else
            "not copied: a frame rate given retimes the frames" if info.sound else None}


def _check_frame_size(encoder: io.Encoder, src, mode: str) -> None:
    """Refuse, before any frame is explained, a video whose output frames the encoder cannot
    take: the first frame decoded, as shown (turned by its display rotation, its pixels made
    square), its picture's size."""
    first = next(io.decode_batches(src, 1, 1), None)
    if first is not None:
        frame = first.frames[0]
        height, width = (render.side_by_side(frame, frame) if mode == "side-by-side" else frame).shape[:2]
        if not encoder.encodable(width, height):
            raise encoder.size_refused(width, height)


def _to_the_end(work) -> None:
    """Run ``work`` (a cleanup that may be run again) to its end, whatever Ctrl-C or SIGTERM
    (raised as exceptions) arrive meanwhile: a second signal right after a first one cut the
    cleanup short and left the temporary video behind."""
    while True:
        try:
            return work()
        except KeyboardInterrupt:
            continue


def _progress(done: int, total: int | None, seconds: float) -> None:
    rate = done / seconds if seconds else 0.0
    if total:
        filled = int(30 * done / total)
        bar = "#" * filled + "-" * (30 - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{total} frames  {rate:.1f} fps")
    else:
        sys.stderr.write(f"\r{done} frames  {rate:.1f} fps")
    sys.stderr.flush()
