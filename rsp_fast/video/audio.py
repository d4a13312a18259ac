"""The source's sound in the heat-map video: its first audio stream copied packet by packet
(never decoded or re-encoded), on the same clock as the frames, so that picture and sound stay
in sync and nothing is lost in quality."""
from __future__ import annotations

import functools
from io import BytesIO
from pathlib import Path

from .io import _av, open_local


class AudioCopy:
    """Copies the first audio stream of ``src`` into an output container whose clock starts at
    ``start`` seconds of the source's. ``attach`` adds the stream (before the first packet is
    written), ``copy_until(t)`` the packets that start before ``t`` seconds of the output (all of
    them: ``None``). ``note`` says what was done, for the report: None when ``src`` has no sound."""

    def __init__(self, src: str | Path, output_format: str, start: float):
        av = _av()
        self.start, self.note = start, None
        self.source = self.stream = self.packets = self.pending = self.output = None
        try:
            source = open_local(src)
        except (av.error.FFmpegError, OSError, ValueError):
            return  # the video decoder reports an unreadable file
        if not source.streams.audio:
            source.close()
            return
        stream = source.streams.audio[0]
        codec = stream.codec_context.name
        if not _fits(stream, output_format):
            source.close()
            self.note = f"not copied: the {output_format} format cannot hold {codec} sound"
            return
        self.source, self.stream, self.note = source, stream, f"copied ({codec})"
        # AVI holds no time before 0: its muxer would move every stream later to fit a packet
        # there (an AAC encoder's priming packet, sound from before the video's start), the
        # picture by a whole frame slot. Such packets are left out there instead, but one that
        # is mostly after 0 starts at 0 (sound off by at most half a packet either way).
        self.from_zero = output_format == "avi"
        self.last_dts, self.copied = None, 0.0
        self.shift = round(start / stream.time_base) if stream.time_base else 0

    def attach(self, output) -> None:
        if self.stream is not None:
            self.output = output
            self.out = output.add_stream_from_template(self.stream)
            self.packets = self.source.demux(self.stream)

    def start_at(self, seconds: float) -> None:
        """The output's clock starts at ``seconds`` of the source's, not at ``start`` (an AVI,
        whose picture starts with its first frame: sound from before it is left out)."""
        if self.stream is not None:
            self.start = seconds
            self.shift = round(seconds / self.stream.time_base) if self.stream.time_base else 0

    def copy_until(self, seconds: float | None) -> None:
        if self.packets is None:
            return
        av = _av()
        try:
            while True:
                packet, self.pending = self.pending or next(self.packets, None), None
                if packet is None:
                    return self.close()
                if packet.pts is None or packet.dts is None:  # the demuxer's end-of-stream packet
                    continue
                at = float(packet.pts * packet.time_base) - self.start
                if seconds is not None and at >= seconds:
                    self.pending = packet
                    return
                if self.last_dts is not None and packet.dts <= self.last_dts:
                    return self.stop("its clock steps back there (recordings joined end to end)")
                self.last_dts = packet.dts
                if self.from_zero and packet.dts < self.shift:
                    if packet.dts + (packet.duration or 0) / 2 <= self.shift:
                        continue
                    packet.pts = packet.dts = self.shift
                packet.pts -= self.shift
                packet.dts -= self.shift
                packet.stream = self.out
                self.output.mux(packet)
                self.copied = at + float((packet.duration or 0) * packet.time_base)
        except av.error.FFmpegError as exc:
            self.stop(f"it is corrupt there ({exc})")

    def stop(self, why: str) -> None:
        """Leave the rest of the sound out, saying how much was copied and why."""
        self.note = f"copied up to {self.copied:.2f} s: {why}"
        self.close()

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        self.source = self.packets = self.pending = None


# What a muxer takes without complaint but cannot carry, so a trial header cannot tell: FFmpeg's
# MPEG-TS muxer writes sound it has no stream type for (PCM, FLAC, ALAC, ...) as private data that
# no demuxer reads back as sound; its FLV muxer aborts the process (an assertion) on some PCM.
_TS_SOUND = {"mp2", "mp3", "aac", "aac_latm", "ac3", "eac3", "dts", "truehd", "opus", "s302m"}


@functools.cache
def _ts_sound_ids() -> frozenset[int]:
    """_TS_SOUND's codecs by id: a stream's codec context is named after its decoder (MP3's
    mp3float, DTS's dca), not after the codec."""
    av, ids = _av(), set()
    for name in _TS_SOUND:
        try:
            ids.add(av.codec.Codec(name, "r").id)
        except ValueError:  # an FFmpeg built without that decoder, which then opens no such stream either
            pass
    return frozenset(ids)


def _fits(stream, output_format: str) -> bool:
    """Whether the output format can hold the stream's codec: a header written to memory says."""
    codec = stream.codec_context.name
    if ((output_format == "mpegts" and stream.codec_context.codec.id not in _ts_sound_ids())
            or (output_format == "flv" and codec.startswith("pcm_"))):
        return False
    av = _av()
    try:
        with av.open(BytesIO(), mode="w", format=output_format) as trial:
            trial.add_stream_from_template(stream)
            trial.start_encoding()
        return True
    except Exception:  # a probe: whatever the muxer refuses, the sound is left out, the video goes on
        return False
