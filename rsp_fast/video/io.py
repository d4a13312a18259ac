"""Video decoding and encoding with PyAV, with every failure turned into one clear error."""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import RSPError


def _av():
    try:
        import av
    except ImportError:
        raise RSPError("video needs PyAV: pip install 'rsp-fast[video]'") from None
    return av


@dataclass
class DecodedBatch:
    frames: np.ndarray  # N×H×W×3 uint8 RGB
    indices: list[int]
    times: list[float]  # presentation times, seconds (the container's clock, not shifted to 0)


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    frames: int | None  # as the container claims; None if unknown
    start: float  # the container's first timestamp, seconds: the output's time 0


def probe(path: str | Path) -> VideoInfo:
    """Size, frame rate and claimed frame count, or an RSPError naming the problem."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        start = container.start_time / 1_000_000 if container.start_time is not None else 0.0  # AV_TIME_BASE
        return VideoInfo(stream.codec_context.width, stream.codec_context.height, Fraction(rate), stream.frames or None, start)


def _open(path: str | Path):
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise RSPError(f"video {str(path)!r} does not exist")
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise RSPError(f"cannot read video {str(path)!r}: not a video or corrupt ({exc})") from None


def _video_stream(container, path):
    if not container.streams.video:
        raise RSPError(f"{str(path)!r} has no video stream")
    return container.streams.video[0]


def decode_batches(path: str | Path, batch_size: int, max_frames: int | None = None) -> Iterator[DecodedBatch]:
    """Frames as RGB batches (grey, alpha and odd sizes converted), in stream order, upright:
    a frame with a display rotation (a phone's portrait video, stored landscape) is turned as
    players show it, so the model sees it upright and the output needs no rotation tag."""
    av = _av()
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        frames, indices, times, count, last = [], [], [], 0, 0.0
        try:
            for frame in container.decode(stream):
                frames.append(_upright(frame))
                indices.append(count)
                times.append(float(frame.time) if frame.time is not None else float(count / (stream.average_rate or 25)))
                last = times[-1]
                count += 1
                if len(frames) == batch_size:
                    yield DecodedBatch(np.stack(frames), indices, times)
                    frames, indices, times = [], [], []
                if max_frames is not None and count >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            raise RSPError(f"video {str(path)!r} is corrupt or truncated after frame {count}: {exc}") from None
        if count == 0:
            raise RSPError(f"video {str(path)!r} has no frames")
        if max_frames is None or count < max_frames:
            _check_complete(container, stream, last, path)
        if frames:
            yield DecodedBatch(np.stack(frames), indices, times)


def _upright(frame) -> np.ndarray:
    """The frame's RGB pixels turned by its display matrix's rotation (counter-clockwise degrees)."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb


def _check_complete(container, stream, last: float, path) -> None:
    """A stream that ends well before the duration its header claims was truncated."""
    if stream.duration is not None and stream.time_base is not None:
        claimed = float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:
        claimed = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        return
    period = 1 / float(stream.average_rate or 25)
    # the last frame's end on the stream's clock: containers count their duration from 0 (Matroska)
    # or from the first timestamp (MP4), and a stream may start late (a phone's video, a cut)
    end = last + period
    if end < claimed - 1.5 * period:
        raise RSPError(f"video {str(path)!r} is truncated: its frames end at {end:.2f} s of the {claimed:.2f} s it claims")


TIME_BASE = Fraction(1, 90_000)  # the MPEG clock: fine enough for any source's timestamps


class Encoder:
    """H.264 (yuv420p) into a temporary file beside ``path``, renamed into place by ``commit``;
    ``abort`` (or an exception) removes it, so a failed run never leaves a half-written video.

    ``write(rgb, time)`` keeps a frame's presentation time (seconds on the source's clock,
    ``start`` becoming 0): a variable-frame-rate source (a phone's video) keeps its timing;
    ``write(rgb)`` puts frames 1/``fps`` apart."""

    def __init__(self, path: str | Path, fps: Fraction, codec: str = "libx264", crf: int = 20, start: float = 0.0):
        av = _av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}{self.path.suffix or '.mp4'}")
        try:
            self.container = av.open(str(self.tmp), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise RSPError(f"cannot write video {str(self.path)!r}: {exc}") from None
        self.fps, self.codec, self.crf = Fraction(fps).limit_denominator(1001), codec, crf
        if codec not in getattr(self.container, "supported_codecs", {codec}):  # before any work, not at the first frame
            self.abort()
            raise RSPError(f"cannot write video {str(self.path)!r}: a {self.path.suffix or 'file without an extension'} "
                           f"cannot hold {codec} video; use .mp4, .mkv, .mov or .avi")
        self.stream = None
        self.frames, self.start, self.last_pts = 0, start, -1

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        av = _av()
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.fps)
            self.stream.codec_context.time_base = TIME_BASE
            # yuv420p needs even sizes: odd frames get one padded row/column
            self.height, self.width = rgb.shape[0] + rgb.shape[0] % 2, rgb.shape[1] + rgb.shape[1] % 2
            self.stream.width, self.stream.height = self.width, self.height
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf)} if self.codec == "libx264" else {}
        if rgb.shape[:2] != (self.height, self.width):
            rgb = np.pad(rgb, ((0, self.height - rgb.shape[0]), (0, self.width - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        seconds = self.frames / self.fps if time is None else Fraction(time - self.start)
        # strictly increasing, whatever the source's timestamps (repeated or stepping back)
        self.last_pts = frame.pts = max(round(seconds / TIME_BASE), self.last_pts + 1)
        frame.time_base = TIME_BASE
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def commit(self) -> Path:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # the container may be half-initialised; the file goes anyway
            pass
        if self.tmp.exists():
            self.tmp.unlink()


def read_frames(path: str | Path, indices: list[int] | None = None) -> list[np.ndarray]:
    """Decoded RGB frames (all, or those at ``indices``), e.g. for a contact sheet or a test."""
    wanted = set(indices) if indices is not None else None
    out = []
    for batch in decode_batches(path, 16):
        out += [f for i, f in zip(batch.indices, batch.frames) if wanted is None or i in wanted]
    return out


def write_video(path: str | Path, frames, fps: Fraction | int = 12) -> Path:
    """Encode RGB frames to ``path`` atomically (used to build the demo clip and test videos)."""
    enc = Encoder(path, Fraction(fps))
    try:
        for f in frames:
            enc.write(f)
        return enc.commit()
    except BaseException:
        enc.abort()
        raise
