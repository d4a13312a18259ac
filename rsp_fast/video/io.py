"""Video decoding and encoding with PyAV, with every failure turned into one clear error."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import RSPError
from ..optional import optional_import, pil
from ..paths import check_readable, temporary_sibling

AVFMT_VARIABLE_FPS = 0x0400  # libavformat: the container keeps per-frame timestamps (AVI does not)
MAX_FRAME_RATE = 1000  # a stream's "average rate" past this is its time base (raw DV's 60000), not a frame rate


def _av():
    return optional_import("av", "video")


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
    sound: bool = False  # whether it has an audio stream


def probe(path: str | Path) -> VideoInfo:
    """Size, frame rate and claimed frame count, or an RSPError naming the problem."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        return VideoInfo(stream.codec_context.width, stream.codec_context.height, _frame_rate(stream),
                         stream.frames or None, _start(container), bool(container.streams.audio))


def _frame_rate(stream) -> Fraction:
    """The stream's frame rate: its average, or FFmpeg's guess where the average is missing or
    is the stream's time base in disguise (above ``MAX_FRAME_RATE``), or 25."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and 0 < rate <= MAX_FRAME_RATE:
            return Fraction(rate)
    return Fraction(25)


def _start(container) -> float:
    """The container's first timestamp in seconds (the output's time 0)."""
    return container.start_time / 1_000_000 if container.start_time is not None else 0.0  # AV_TIME_BASE


def open_local(path: str | Path):
    """``path`` opened for reading as the file it names: through FFmpeg's file protocol (a name
    like ``concat:x.mp4`` or ``pipe:0`` is not another protocol) and with no image-sequence
    pattern (``shot_%d.png`` is that one picture, not shot_1.png, shot_2.png, ...)."""
    return _av().open(f"file:{Path(path).absolute()}", mode="r", options={"pattern_type": "none"})


def _open(path: str | Path):
    av = _av()
    path = Path(path)
    check_readable(path, "video")
    try:
        return open_local(path)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise RSPError(f"cannot read video {str(path)!r}: not a video or corrupt ({exc})") from None


def _video_stream(container, path):
    if not any(stream.type in ("video", "audio", "subtitle") for stream in container.streams):
        # none, or only streams of unknown kind: an MP4 whose index was cut before it said what they hold
        raise RSPError(f"video {str(path)!r} holds no stream FFmpeg can name: truncated, or not a video")
    # a cover picture (an MP3's or an M4A's artwork) is a video stream of one still: not a video
    moving = [s for s in container.streams.video if not s.disposition & _av().stream.Disposition.attached_pic]
    if not moving:
        raise RSPError(f"{str(path)!r} has no video stream" + (" (only a cover picture)" if container.streams.video else ""))
    return moving[0]


def decode_batches(path: str | Path, batch_size: int, max_frames: int | None = None) -> Iterator[DecodedBatch]:
    """Frames as RGB batches (grey, alpha and odd sizes converted), in stream order, upright:
    a frame with a display rotation (a phone's portrait video, stored landscape) is turned as
    players show it, so the model sees it upright and the output needs no rotation tag; a
    frame whose size changed mid-stream is fitted into the first frame's."""
    av = _av()
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        frames, indices, times, count, reached, shown = [], [], [], 0, 0.0, None
        clock, size = _frame_clock(container, stream), None
        try:
            for frame in container.decode(stream):
                rgb = _upright(_square_pixels(frame.to_ndarray(format="rgb24"), stream), frame)
                size = size or rgb.shape[:2]
                frames.append(rgb if rgb.shape[:2] == size else _fit(rgb, size))
                indices.append(count)
                times.append(clock(frame, count))
                # how far the stream's own clock got (an AVI's chunk count, gaps included)
                reached = max(reached, float(frame.time) if frame.time is not None else times[-1])
                shown = _frame_length(frame)
                count += 1
                if len(frames) == batch_size:
                    yield DecodedBatch(np.stack(frames), indices, times)
                    frames, indices, times = [], [], []
                if max_frames is not None and count >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            if "webp" in container.format.name:  # FFmpeg reads WebP stills only
                raise RSPError(f"video {str(path)!r} does not decode: FFmpeg decodes no animated WebP (turn it into a "
                               "GIF or a video first), and a still one only whole") from None
            raise RSPError(f"video {str(path)!r} is corrupt or truncated after frame {count}: {exc}") from None
        if count == 0:
            claimed = " (truncated or corrupt: its header claims frames)" if stream.frames or stream.duration else ""
            raise RSPError(f"video {str(path)!r} has no frames{claimed}")
        if max_frames is None or count < max_frames:
            _check_complete(container, stream, reached, shown, path)
        if frames:
            yield DecodedBatch(np.stack(frames), indices, times)


def _frame_clock(container, stream):
    """A frame's time in seconds on the container's clock: its presentation timestamp (a frame
    without one: a frame period after the last), or, in an AVI of B-frames, whose timestamps are
    chunk counts in decoding order (out of order once the frames are shown in theirs), the
    container's start plus its index over the rate. (An AVI's chunk counts are times otherwise,
    skipped chunks, a capture's dropped frames, included.)"""
    rate, start = _frame_rate(stream), _start(container)
    by_index = container.format.name == "avi" and bool(stream.codec_context.has_b_frames)
    last = None

    def clock(frame, index: int) -> float:
        nonlocal last
        if by_index:
            return start + float(index / rate)
        if frame.time is not None:
            last = float(frame.time)
        else:
            last = start if last is None else last + float(1 / rate)
        return last
    return clock


# FFmpeg's display transforms (what ffmpeg and ffplay apply for a display matrix at these angles)
_TRANSPOSES = {"clock": lambda a: np.rot90(a, -1), "cclock": lambda a: np.rot90(a, 1),
               "clock_flip": lambda a: np.rot90(a, -1)[::-1], "cclock_flip": lambda a: a.transpose(1, 0, 2)}


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's 3×3 display matrix (9 int32, 16.16 fixed point), if it has one."""
    av = _av()
    try:
        data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    except (AttributeError, KeyError, ValueError):
        return None
    return np.frombuffer(bytes(data), "<i4") if data is not None and len(bytes(data)) == 36 else None


def _upright(rgb: np.ndarray, frame) -> np.ndarray:
    """The frame's pixels as players show them: turned, and mirrored, by its display matrix, as
    ffmpeg's autorotation does (quarter turns; other angles rounded to the nearest one)."""
    matrix = _display_matrix(frame)
    theta = -round(getattr(frame, "rotation", 0) or 0) % 360  # clockwise degrees
    if matrix is None or min(abs(theta - a) for a in (0, 90, 180, 270, 360)) >= 1:
        turned = np.rot90(rgb, round(-theta / 90) % 4)
    elif abs(theta - 90) < 1:
        turned = _TRANSPOSES["cclock_flip" if matrix[3] > 0 else "clock"](rgb)
    elif abs(theta - 270) < 1:
        turned = _TRANSPOSES["clock_flip" if matrix[3] < 0 else "cclock"](rgb)
    else:  # no turn, or half a turn: each axis flipped where its scale is negative
        turned = rgb[::-1 if matrix[4] < 0 else 1, ::-1 if abs(theta - 180) < 1 and matrix[0] < 0 else 1]
    return turned if turned is rgb else np.ascontiguousarray(turned)


def _square_pixels(rgb: np.ndarray, stream) -> np.ndarray:
    """A frame whose pixels are not square (anamorphic DV, DVD, HDV: a sample aspect ratio other
    than 1) stretched to the width it is shown at, as players show it; others as they are."""
    ratio = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if not ratio or ratio == 1:
        return rgb
    width = max(1, round(rgb.shape[1] * ratio))
    Image = pil()
    return np.asarray(Image.fromarray(rgb).resize((width, rgb.shape[0]), Image.BILINEAR)) if width != rgb.shape[1] else rgb


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A frame whose size changed mid-stream (a spliced or adaptive-bitrate recording) fitted
    into the first frame's size: scaled with its aspect ratio kept, centred on black."""
    Image = pil()

    h, w = size
    scale = min(h / rgb.shape[0], w / rgb.shape[1])
    nh, nw = max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale))
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    return out


def _frame_length(frame) -> float | None:
    """How long a frame is shown, where its packet says (a GIF's pause on its last frame, a
    slideshow's held picture), else None."""
    duration, base = getattr(frame, "duration", None), frame.time_base
    return float(duration * base) if duration and base is not None else None


def _check_complete(container, stream, last: float, shown: float | None, path) -> None:
    """A stream that ends well before the duration its header claims was truncated. ``last``:
    the last frame's time on the stream's own clock (an AVI's counts skipped chunks: dropped
    frames), ``shown``: how long it is shown (None: one frame period)."""
    tagged = _tag_seconds(stream.metadata.get("DURATION"))  # Matroska keeps each stream's own duration as a tag
    # ASF gives every stream the file's play duration (its sound's too): the container's rule below
    if stream.duration is not None and stream.time_base is not None and container.format.name != "asf":
        claimed = float(stream.duration * stream.time_base)
    elif tagged is not None:
        claimed = tagged
    elif container.duration is not None and len(container.streams) == 1:
        claimed = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        return
    period = 1 / float(_frame_rate(stream))
    # the last frame's end on the stream's clock: containers count their duration from 0 (Matroska)
    # or from the first timestamp (MP4), and a stream may start late (a phone's video, a cut)
    end = last + max(period, shown or 0)
    if end < claimed - 1.5 * period:
        raise RSPError(f"video {str(path)!r} is truncated: its frames end at {end:.2f} s of the {claimed:.2f} s it claims")


# Output formats that take H.264 but lose frames' presentation times: elementary streams and raw
# files keep none (.h264, .yuv), ASF returns x264's B-frames' times out of order (.wmv, .asf)
UNTIMED_FORMATS = {"asf", "asf_stream", "rawvideo", "h264", "hevc", "mpeg1video", "mpeg2video", "m4v"}


def _holds(format_name: str, codec: str) -> bool:
    """Whether a ``format_name`` file takes ``codec`` video, tried on one small frame in memory:
    FFmpeg cannot say for some formats (MPEG-TS holds H.264, though PyAV lists no codec for it).
    Checked before any work, not at the first frame."""
    import io as memory

    av = _av()
    try:
        with av.open(memory.BytesIO(), mode="w", format=format_name) as c:
            stream = c.add_stream(codec, rate=25)
            stream.width = stream.height = 16
            stream.pix_fmt = "yuv420p"
            for packet in [*stream.encode(av.VideoFrame(16, 16, "yuv420p")), *stream.encode(None)]:
                c.mux(packet)
        return True
    except Exception:  # FFmpeg's and PyAV's errors alike: the format does not take it
        return False


def _tag_seconds(text) -> float | None:
    """"HH:MM:SS.fraction" (a Matroska DURATION tag) in seconds; None for anything else."""
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", str(text or "").strip())
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None


TIME_BASE = Fraction(1, 90_000)  # the MPEG clock: fine enough for any source's timestamps
BT709, BT601, STUDIO_RANGE = 1, 6, 1  # libavutil's AVCOL_SPC/PRI/TRC_BT709, _SMPTE170M and AVCOL_RANGE_MPEG


ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast"},  # 2.6x the speed of x264's default preset on HD heat maps, files no larger
    "mpeg4": {"flags": "qscale", "qmin": "3", "qmax": "3"},  # a fixed quantiser: 36 dB on a photo, x264's crf 20 37 dB
}


class Encoder:
    """H.264 (yuv420p; MPEG-4 Part 2 in an AVI) into a temporary file beside ``path``, renamed into place by ``commit``;
    ``abort`` (or an exception) removes it, so a failed run never leaves a half-written video.

    ``write(rgb, time)`` keeps a frame's presentation time (seconds on the source's clock,
    ``start`` becoming 0): a variable-frame-rate source (a phone's video) keeps its timing;
    ``write(rgb)``, and every frame in a container without timestamps (AVI), puts frames
    1/``fps`` apart. ``audio_from``: a video whose sound is copied in (on the same clock: only
    with the frames' own times); ``audio_note`` says what was done."""

    def __init__(self, path: str | Path, fps: Fraction, codec: str = "libx264", crf: int = 20, start: float = 0.0,
                 audio_from: str | Path | None = None):
        av = _av()
        self.path, self.audio = Path(path), None
        self.folders = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]  # abort removes them
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_sibling(self.path, self.path.suffix or ".mp4")
        try:
            self.container = av.open(str(self.tmp), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self.container = None
            self.abort()  # the folders made for it
            raise RSPError(f"cannot write video {str(self.path)!r}: {exc}") from None
        if self.container.format.name in UNTIMED_FORMATS:
            name = self.container.format.name
            self.abort()
            raise RSPError(f"cannot write video {str(self.path)!r}: a {self.path.suffix or 'file without an extension'} "
                           f"({name}) does not keep each frame's time; use .mp4, .mkv, .mov or .avi")
        if self.container.format.name == "avi" and codec == "libx264":
            # AVI keeps no presentation times: FFmpeg reads H.264 there one frame late (two with
            # sound interleaved), even without B-frames; MPEG-4 Part 2, AVI's own, starts at 0
            codec = "mpeg4"
        self.fps, self.codec, self.crf = Fraction(fps).limit_denominator(1001), codec, crf
        if codec == "mpeg4":  # MPEG-4 Part 2 counts time in at most 65535 ticks a second (119.88 fps is 120000/1001)
            self.fps = 1 / (1 / self.fps).limit_denominator(65535)
        if codec not in getattr(self.container, "supported_codecs", {codec}) and not _holds(self.container.format.name, codec):
            self.abort()
            raise RSPError(f"cannot write video {str(self.path)!r}: a {self.path.suffix or 'file without an extension'} "
                           f"cannot hold {codec} video; use .mp4, .mkv, .mov or .avi")
        self.stream = None
        self.frames, self.start, self.last_pts, self.jump = 0, start, -1, Fraction(0)
        self.time_base = TIME_BASE if self.container.format.flags & AVFMT_VARIABLE_FPS else 1 / self.fps
        if audio_from is not None:
            from .audio import AudioCopy  # audio.py reads PyAV through this module's _av
            self.audio = AudioCopy(audio_from, self.container.format.name, start)
        self.audio_note = self.audio.note if self.audio is not None else None

    def encodable(self, width: int, height: int) -> bool:
        """Whether the codec takes frames of this size (x264 at most 16384 pixels a side, MPEG-4
        Part 2 under 8192): its encoder opened on the size, a few milliseconds."""
        av = _av()
        context = av.CodecContext.create(self.codec, "w")
        context.width, context.height, context.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        context.time_base, context.options = 1 / self.fps, ENCODER_OPTIONS.get(self.codec, {})
        try:
            context.open()
            return True
        except av.error.FFmpegError:
            return False

    def size_refused(self, width: int, height: int) -> RSPError:
        return RSPError(f"cannot write video {str(self.path)!r}: its {self.codec} encoder does not take frames of "
                        f"{width}x{height} pixels, padded to even sides (x264 takes at most 16384 a side, MPEG-4 in "
                        "an .avi at most 8190)")

    def write(self, rgb: np.ndarray, time: float | None = None) -> None:
        try:
            self._write(rgb, time)
        except _av().error.FFmpegError as exc:
            if self.stream is not None and not self.encodable(self.width, self.height):
                raise self.size_refused(self.width, self.height) from None
            raise RSPError(f"cannot write video {str(self.path)!r}: {exc}") from None

    def _write(self, rgb: np.ndarray, time: float | None) -> None:
        av = _av()
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.fps)
            self.stream.codec_context.time_base = self.time_base
            # yuv420p needs even sizes: odd frames get one padded row/column
            self.height, self.width = rgb.shape[0] + rgb.shape[0] % 2, rgb.shape[1] + rgb.shape[1] % 2
            self.stream.width, self.stream.height = self.width, self.height
            self.stream.pix_fmt = "yuv420p"
            # converted to YUV with BT.709's matrix and tagged so (BT.709 throughout, studio range):
            # untagged, players guess BT.601 or BT.709 by the frame's size. MPEG-4 Part 2 (an AVI's)
            # keeps no tag, and FFmpeg decodes untagged video with BT.601's matrix: that one there
            self.matrix, self.tag = ("itu601", BT601) if self.codec == "mpeg4" else ("itu709", BT709)
            context = self.stream.codec_context
            context.colorspace = context.color_primaries = context.color_trc = self.tag
            context.color_range = STUDIO_RANGE
            self.stream.options = ENCODER_OPTIONS.get(self.codec, {})
            if self.codec == "libx264":
                self.stream.options = {**self.stream.options, "crf": str(self.crf)}
            if self.audio is not None:  # every stream is added before the first packet
                self.audio.attach(self.container)
                if time is not None and self.time_base != TIME_BASE:
                    self.audio.start_at(time)  # an AVI's picture starts with this frame, whatever its time
        if rgb.shape[:2] != (self.height, self.width):
            rgb = np.pad(rgb, ((0, self.height - rgb.shape[0]), (0, self.width - rgb.shape[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
            format="yuv420p", dst_colorspace=self.matrix)
        frame.colorspace = frame.color_primaries = frame.color_trc = self.tag
        frame.color_range = STUDIO_RANGE
        seconds = self.frames / self.fps if time is None or self.time_base != TIME_BASE else Fraction(time - self.start) + self.jump
        if self.last_pts < 0 and seconds < 0:  # a first frame before the source's start: it starts the output
            self.jump -= seconds
            seconds = Fraction(0)
        if self.last_pts >= 0 and round(seconds / self.time_base) <= self.last_pts:
            # the source's clock stood still or stepped back (spliced recordings, a timestamp
            # reset): go on one frame period after the last frame, and so for the frames after
            resumed = self.last_pts * self.time_base + 1 / self.fps
            self.jump += resumed - seconds
            seconds = resumed
        self.last_pts = frame.pts = round(seconds / self.time_base)
        frame.time_base = self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1
        if self.audio is not None:  # the sound up to this frame: the muxer interleaves the two
            self.audio.copy_until(float(self.last_pts * self.time_base))

    @property
    def end(self) -> float:
        """Seconds of the output up to the end of the last frame written (one frame period after its start)."""
        return float(self.last_pts * self.time_base + 1 / self.fps) if self.last_pts >= 0 else 0.0

    def commit(self, audio_until: float | None = None) -> Path:
        """Finish the file (the sound up to ``audio_until`` seconds of the output, or all of it)."""
        av = _av()
        try:
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
                if self.audio is not None:
                    self.audio.copy_until(audio_until)
                    self.audio_note = self.audio.note
            if self.audio is not None:  # cut before its end, the source would stay open until a gc pass
                self.audio.close()
            self.container.close()
            os.replace(self.tmp, self.path)
        except (av.error.FFmpegError, OSError) as exc:
            raise RSPError(f"cannot write video {str(self.path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; safe to call again (a second Ctrl-C may cut a first call short)."""
        audio, self.audio = self.audio, None
        if audio is not None:
            audio.close()
        try:
            if self.container is not None:
                self.container.close()
        except Exception:  # the container may be half-initialised, or closed already; the file goes anyway
            pass
        try:
            self.tmp.unlink(missing_ok=True)
            for folder in self.folders:  # the innermost first; one holding something else stays
                folder.rmdir()
        except OSError:  # whatever made the run fail (a full disk, a gone folder) is the error to report
            pass


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
