"""Heat-map videos: the pipeline, the CLI, the report, and every kind of bad input."""
import gc
import json
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import rsp_fast
from rsp_fast.errors import RSPError
from rsp_fast.models import ModelSpec
from rsp_fast.video import explain_video
from rsp_fast.video.io import probe, read_frames, write_video
from rsp_fast.video.pipeline import _Stage, _to_the_end
from models import tiny_cnn

TESTS = Path(__file__).parent


def _frames(n, h=36, w=52, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def _encode(path, frames, pix_fmt="yuv420p", array_format="rgb24", fps=6, codec="ffv1", rotation=None, times=None,
            sound=None):
    """A video for the decoder tests: lossless FFV1 by default, with a chosen pixel format (grey,
    alpha), or another ``codec``; ``rotation``: a display rotation tag (counter-clockwise
    degrees); ``times``: each frame's presentation time in seconds (default i/fps: a variable
    frame rate otherwise); ``sound``: (codec, sample rate, mono samples, first sample's pts)."""
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=fps)
    s.height, s.width = frames[0].shape[:2]
    s.pix_fmt = pix_fmt
    clock = Fraction(1, 1000) if times is not None else Fraction(1, fps)
    s.codec_context.time_base = clock
    if rotation is not None:
        s.set_display_rotation(rotation)
    streams = [s]
    for i, f in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(f, format=array_format)
        frame.pts, frame.time_base = (i if times is None else round(times[i] * 1000)), clock
        for p in s.encode(frame):
            c.mux(p)
    if sound is not None:
        audio_codec, rate, samples, first = sound
        streams.append(a := c.add_stream(audio_codec, rate=rate, layout="mono"))
        chunk = 960 if audio_codec == "libopus" else 800  # Opus takes 20 ms frames
        sample_format = "s16" if samples.dtype == np.int16 else "flt"
        for i in range(0, len(samples) - chunk + 1, chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, i:i + chunk], format=sample_format, layout="mono")
            frame.sample_rate, frame.pts = rate, first + i
            for p in a.encode(frame):
                c.mux(p)
    for stream in streams:
        for p in stream.encode():
            c.mux(p)
    c.close()
    return path


@pytest.fixture
def spec():
    return ModelSpec(tiny_cnn(), "tiny", input_size=64, class_names=[f"c{i}" for i in range(5)])


def _only_output(tmp_path, name):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out")))


def test_pipeline_keeps_frames_rate_and_aspect(tmp_path, spec):
    src = write_video(tmp_path / "in.mp4", _frames(7, 36, 52), fps=6)
    dst = tmp_path / "out.mp4"
    report = explain_video(spec, src, dst, batch_size=3, progress=False)
    info = probe(dst)
    assert (info.width, info.height) == (52, 36) and info.fps == Fraction(6)
    assert len(read_frames(dst)) == 7
    with av.open(str(dst)) as c:  # the output's own timestamps advance by 1/fps
        times = [f.time for f in c.decode(video=0)]
    assert np.allclose(np.diff(times), 1 / 6, atol=1e-3)
    rows = report["frames"]
    assert [r["index"] for r in rows] == list(range(7))
    assert np.allclose(np.diff([r["time"] for r in rows]), 1 / 6)
    assert all(set(r) == {"index", "time", "label", "name", "score", "target", "seconds"} for r in rows)
    assert all(r["name"] == f"c{r['label']}" and 0 < r["score"] <= 1 for r in rows)
    totals = report["totals"]
    assert totals["frames"] == 7 and totals["fps"] > 0
    assert {"decode_s", "attribute_s", "encode_s"} <= set(totals)
    assert _only_output(tmp_path, "out") == ["out.mp4"]  # no temporary left


def test_pipeline_matches_the_api_frame_by_frame(tmp_path, spec):
    """The video's labels are what RSP on the letterboxed frame predicts."""
    frames = _frames(4)
    src = write_video(tmp_path / "in.mkv", frames, fps=4)
    report = explain_video(spec, src, tmp_path / "out.mp4", batch_size=2, progress=False, target=2)
    assert [r["target"] for r in report["frames"]] == [2] * 4
    from rsp_fast.render import to_model_input
    decoded = read_frames(src)
    x, _ = to_model_input(np.stack(decoded), 64, spec.mean, spec.std)
    logits = spec.model(x)
    assert [r["label"] for r in report["frames"]] == logits.argmax(1).tolist()


def test_clip_models_explain_each_batch_of_frames_as_one_clip(tmp_path, monkeypatch):
    """A video classifier (3-D convs): each batch of frames is one clip (the last, shorter one
    filled up with its last frame, to the length the model's temporal kernels expect); every
    frame of a clip gets the clip's label, and a frame's map is its slice of the clip's."""
    import torch
    from torch import nn
    from rsp_fast import render
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    spec = ModelSpec(model, "clips", input_size=32, class_names=[f"c{i}" for i in range(5)])
    src = write_video(tmp_path / "in.mkv", _frames(7), fps=4)
    drawn = {}  # the heat map each frame is rendered with (frames may be drawn by several threads)
    overlay = render.overlay
    monkeypatch.setattr(render, "overlay", lambda frame, heat, scale: drawn.setdefault(frame.tobytes(), heat) is None
                        or overlay(frame, heat, scale))
    report = explain_video(spec, src, tmp_path / "out.mp4", batch_size=3, progress=False)
    assert report["totals"]["frames"] == 7 and len(read_frames(tmp_path / "out.mp4")) == 7
    decoded = np.stack(read_frames(src))
    for start in (0, 3, 6):
        frames = decoded[start:start + 3]
        x, box = render.to_model_input(np.concatenate([frames, frames[-1:].repeat(3 - len(frames), 0)]), 32,
                                       spec.mean, spec.std)
        clip = x.transpose(0, 1).unsqueeze(0)  # 1×C×T×H×W
        label = int(model(clip).argmax())
        assert [r["label"] for r in report["frames"][start:start + 3]] == [label] * len(frames)
        expected = render.heat_to_frame(rsp_fast.heatmap(rsp_fast.RSP(model).attribute(clip))[0], box).numpy()
        expected = expected[:len(frames)]
        maps = np.stack([drawn[f.tobytes()] for f in decoded[start:start + 3]])
        assert np.allclose(maps, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_a_clip_model_traced_per_input_shape_is_given_clips(tmp_path):
    """A video classifier whose forward branches on sizes has no plan before its first call:
    it was taken for an image model and its 3-D convs got N×C×H×W frames (exit 2)."""
    import torch
    from torch import nn

    class BranchesOnTheLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            if x.shape[2] > 1:  # fx cannot trace this without an input
                x = x[:, :, ::1]
            return self.fc(self.features(x).mean((2, 3, 4)))
    torch.manual_seed(0)
    model = BranchesOnTheLength().eval()
    assert rsp_fast.RSP(model).plan is None
    src = write_video(tmp_path / "in.mkv", _frames(5), fps=4)
    report = explain_video(ModelSpec(model, "clips", input_size=32), src, tmp_path / "out.mp4", batch_size=3, progress=False)
    assert report["totals"]["frames"] == 5
    labels = [r["label"] for r in report["frames"]]
    assert labels[:3] == [labels[0]] * 3 and labels[3:] == [labels[3]] * 2  # a clip's label for each of its frames


def test_frames_drawn_by_a_pool_of_threads_stay_in_order(tmp_path, spec, monkeypatch):
    """On a machine with more cores the frames of a batch are drawn by several threads: the
    encoder gets the pictures a single thread draws, in the same order (running scale
    included). Compared before encoding: a lossy codec turns a one-unit difference from the
    attribution's float rounding (its parallel sums) into block-sized ones."""
    from rsp_fast.video import io as video_io, pipeline
    src = write_video(tmp_path / "in.mp4", _frames(9), fps=6)
    written = {1: [], 3: []}
    write = video_io.Encoder.write
    for threads in (1, 3):
        monkeypatch.setattr(pipeline, "RENDER_THREADS", threads)
        monkeypatch.setattr(video_io.Encoder, "write", lambda self, rgb, time=None, out=written[threads]:
                            out.append((rgb.copy(), time)) or write(self, rgb, time))
        explain_video(spec, src, tmp_path / f"out{threads}.mp4", batch_size=4, scale="running", progress=False)
    assert [t for _, t in written[1]] == [t for _, t in written[3]] and len(written[1]) == 9
    one, three = (np.stack([rgb for rgb, _ in written[n]]).astype(int) for n in (1, 3))
    assert np.abs(one - three).max() <= 4  # a value on a colour table's boundary may move one level
    # and each picture is drawn on its own frame: with the overlay drawing the frame itself, the
    # pictures below the label's band are the decoded frames, in order
    from rsp_fast import render
    monkeypatch.setattr(render, "overlay", lambda frame, heat, scale: frame.copy())
    written[3].clear()
    explain_video(spec, src, tmp_path / "plain.mp4", batch_size=4, progress=False)
    band = 12 + 5 + 6  # draw_label's band on 36-pixel frames, and room for descenders
    assert np.array_equal(np.stack([rgb[band:] for rgb, _ in written[3]]), np.stack(read_frames(src))[:, band:])


def test_explain_frames_from_any_source(spec):
    """explain_frames takes frames from any iterable (here a generator of two sizes and a grey
    frame): one result per frame, in order, each the map RSP gives its letterboxed frame alone,
    whatever the batch size; a frame that is not uint8 RGB or grey is named."""
    from rsp_fast.render import heat_to_frame, to_model_input
    from rsp_fast.video import explain_frames
    frames = _frames(3, 36, 52) + _frames(2, 40, 30, seed=1) + [_frames(1, 20, 20, seed=2)[0][..., 0]]
    results = {b: list(explain_frames(spec, (f for f in frames), batch_size=b)) for b in (1, 4)}
    assert [len(r) for r in results.values()] == [6, 6]
    for k, frame in enumerate(frames):
        rgb = np.repeat(frame[..., None], 3, 2) if frame.ndim == 2 else frame
        x, box = to_model_input(rgb[None], 64, spec.mean, spec.std)
        ex = rsp_fast.RSP(spec.model).explain(x)
        expected = heat_to_frame(rsp_fast.heatmap(ex.attribution), box)[0].numpy()
        for r in (results[1][k], results[4][k]):
            assert r.heat.shape == frame.shape[:2] and np.allclose(r.heat, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
            assert r.label == r.target == int(ex.logits.argmax()) and r.name == f"c{r.label}" and 0 < r.score <= 1
    with pytest.raises(RSPError, match="frame 1 must be an H×W×3"):
        list(explain_frames(spec, [frames[0], frames[0].astype(np.float32)]))
    with pytest.raises(RSPError, match="frame 1 has no pixels"):
        list(explain_frames(spec, [frames[0], frames[0][:0]]))
    with pytest.raises(RSPError, match="batch size must be an int of at least 1, not 2.5"):
        explain_frames(spec, frames, batch_size=2.5)  # at the call, before any frame is read
    with pytest.raises(RSPError, match="target must be one class"):
        explain_frames(spec, frames, target=[1, 2])
    with pytest.raises(RSPError, match="target class -1 is out of range"):
        explain_frames(spec, frames, target=-1)  # at the call too (it was at the first batch's end)
    with pytest.raises(RSPError, match="built for another model"):
        explain_frames(spec, frames, explainer=rsp_fast.RSP(tiny_cnn()))
    with pytest.raises(RSPError, match="explainer must be an rsp_fast.RSP, not str"):
        explain_frames(spec, frames, explainer="rsp")
    with pytest.raises(RSPError, match="frames must be an iterable of pictures, not int"):
        explain_frames(spec, 5)  # at the call


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pictures_reach_the_model_in_its_own_dtype(dtype):
    from rsp_fast.render import heat_to_frame, to_model_input
    from rsp_fast.video import explain_frames
    torch.manual_seed(0)
    spec = ModelSpec(tiny_cnn().to(dtype), "tiny", input_size=32)
    frame = _frames(1, 36, 52)[0]
    (result,) = explain_frames(spec, [frame])
    x, box = to_model_input(frame[None], 32, spec.mean, spec.std)
    ex = rsp_fast.RSP(spec.model).explain(x.to(dtype))
    expected = heat_to_frame(rsp_fast.heatmap(ex.attribution), box)[0].numpy()
    assert np.array_equal(result.heat, expected) and result.label == int(ex.logits.argmax())


def test_labels_come_from_the_logits_even_when_probabilities_tie(tmp_path, spec):
    """Logits 2e-8 apart are distinct, their float32 softmax probabilities are not: the label
    is the logits' argmax, the class RSP explains."""
    import torch

    class NearlyTied(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.register_buffer("offset", torch.tensor([0.0, 0.0, 2e-8, 0.0, 0.0]))

        def forward(self, x):
            return self.base(x) * 1e-10 + self.offset
    tied = ModelSpec(NearlyTied(spec.model), "tied", input_size=64, class_names=spec.class_names)
    src = write_video(tmp_path / "in.mp4", _frames(3), fps=3)
    report = explain_video(tied, src, tmp_path / "out.mp4", batch_size=3, progress=False)
    assert [(r["label"], r["target"]) for r in report["frames"]] == [(2, 2)] * 3


def test_side_by_side_max_frames_fps_and_odd_sizes(tmp_path, spec):
    src = write_video(tmp_path / "in.mp4", _frames(9, 35, 47), fps=5)
    dst = tmp_path / "out.mp4"
    report = explain_video(spec, src, dst, mode="side-by-side", max_frames=4, fps=10, scale="running", progress=False)
    info = probe(dst)
    assert report["totals"]["frames"] == 4 and len(read_frames(dst)) == 4
    assert info.fps == Fraction(10)
    assert info.width == 2 * 48 and info.height == 36  # frames are padded to even sizes for yuv420p


def _timed_video(path, times, size=(36, 52)):
    """An H.264 video whose frames show at ``times`` (seconds): a variable frame rate."""
    return _encode(path, _frames(len(times), *size), codec="libx264", fps=10, times=times)


def _frame_times(path):
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


def test_a_file_is_read_by_its_name_not_as_an_ffmpeg_pattern_or_protocol(tmp_path):
    """FFmpeg took 'shot_%d.png' for an image sequence (it read shot_1.png, shot_2.png) and
    'concat:x.mp4' for its concat protocol (it read x.mp4): the wrong pictures, explained with rc 0."""
    from PIL import Image

    Image.fromarray(np.full((16, 24, 3), (255, 0, 0), np.uint8)).save(tmp_path / "shot_%d.png")
    for i in (1, 2):
        Image.fromarray(np.full((16, 24, 3), (0, 0, 255), np.uint8)).save(tmp_path / f"shot_{i}.png")
    frames = read_frames(tmp_path / "shot_%d.png")
    assert len(frames) == 1 and frames[0][8, 12, 0] > 200 and frames[0][8, 12, 2] < 50  # the red one
    frame = lambda i: np.full((16, 24, 3), 10 * i, np.uint8)  # noqa: E731
    write_video(tmp_path / "concat:x.mp4", (frame(i) for i in range(3)), fps=10)
    write_video(tmp_path / "x.mp4", (frame(i) for i in range(7)), fps=10)
    assert len(read_frames(tmp_path / "concat:x.mp4")) == 3


def test_variable_frame_rate_keeps_each_frames_time(tmp_path, spec):
    """A phone's video has gaps and uneven frame intervals: each output frame shows when its
    input frame did (the clock starting at 0), so the heat map stays in sync with the source."""
    times = [0.5, 0.6, 0.7, 1.2, 1.25, 2.0, 2.033]
    src = _timed_video(tmp_path / "in.mkv", times)
    assert np.allclose(_frame_times(src), times)
    report = explain_video(spec, src, tmp_path / "out.mp4", batch_size=3, progress=False)
    assert np.allclose(_frame_times(tmp_path / "out.mp4"), np.subtract(times, 0.5), atol=1e-3)
    assert np.allclose([r["time"] for r in report["frames"]], times)
    # a rate given retimes the frames evenly
    explain_video(spec, src, tmp_path / "even.mp4", fps=10, progress=False)
    assert np.allclose(_frame_times(tmp_path / "even.mp4"), np.arange(len(times)) / 10, atol=1e-3)


def test_a_last_frame_held_longer_is_no_truncation(tmp_path):
    """A GIF that pauses on its last frame before looping (and a slideshow that holds its last
    picture) ends later than one average frame after its last frame starts: every frame is
    read, none refused as truncated."""
    from PIL import Image

    from rsp_fast.video.io import decode_batches

    frames = [Image.fromarray(np.full((32, 48, 3), 30 * i, np.uint8)) for i in range(8)]
    frames[0].save(tmp_path / "pause.gif", save_all=True, append_images=frames[1:], duration=[100] * 7 + [900], loop=0)
    batches = list(decode_batches(tmp_path / "pause.gif", 4))
    assert sum(len(b.indices) for b in batches) == 8
    assert np.allclose([t for b in batches for t in b.times], np.arange(8) / 10)


def _video_with_sound(path, audio_codec="pcm_s16le", seconds=2.0, fps=10, rate=8000, beep_at=1.0, offset=0.0):
    """Frames at ``fps`` and a mono sound track: silence, then a tone from ``beep_at`` seconds;
    both streams' clocks start at ``offset`` seconds (a cut from a longer recording)."""
    t = np.arange(round(seconds * rate)) / rate
    tone = np.where(t >= beep_at, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0)
    samples = (tone * 32767).astype(np.int16) if audio_codec == "pcm_s16le" else tone.astype(np.float32)
    n = round(seconds * fps)
    return _encode(path, _frames(n), codec="libx264", fps=fps, times=[offset + i / fps for i in range(n)],
                   sound=(audio_codec, rate, samples, round(offset * rate)))


def _sound(path):
    """The output's sound as float samples on its clock: (samples, rate, first sample's time)."""
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
    samples = np.concatenate([f.to_ndarray().astype(np.float64).reshape(-1) for f in frames])
    return samples, frames[0].sample_rate, float(frames[0].time)


def test_spliced_recording_with_a_new_size_and_a_clock_reset(tmp_path, spec):
    """Two MPEG-TS recordings joined byte by byte (as `cat a.ts b.ts` does): the second has
    another frame size and its clock starts again at 0. Its frames are fitted into the first
    size (aspect kept), and the output's clock goes on one frame period after the join."""
    sound = ("mp2", 16000, np.zeros(8000, np.int16), 0)  # half a second of silence in each part
    first = _encode(tmp_path / "a.ts", _frames(5, 36, 52), codec="libx264", fps=10, sound=sound).read_bytes()
    second = _encode(tmp_path / "b.ts", _frames(5, 40, 40, seed=1), codec="libx264", fps=10, sound=sound).read_bytes()
    (tmp_path / "joined.ts").write_bytes(first + second)
    report = explain_video(spec, tmp_path / "joined.ts", tmp_path / "out.mp4", batch_size=4, progress=False)
    assert report["totals"]["frames"] == 10 and probe(tmp_path / "out.mp4").width == 52
    assert report["audio"].startswith("copied up to 0.") and "clock steps back" in report["audio"]  # the first part's
    assert np.allclose(np.diff(_frame_times(tmp_path / "out.mp4")), 0.1, atol=1e-3)
    fitted = read_frames(tmp_path / "joined.ts")[7]
    assert fitted.shape == (36, 52, 3) and fitted[:, :6].max() < 40 < fitted[:, 8:44].mean()  # black bars beside it


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_sound_is_copied_in_sync(tmp_path, spec, offset):
    """The source's sound is in the heat-map video, on the frames' clock: the tone that starts
    1 s after the first frame still does (the output's clock starts at 0 whatever the source's);
    --max-frames ends it with the last frame."""
    src = _video_with_sound(tmp_path / "in.mkv", offset=offset)
    report = explain_video(spec, src, tmp_path / "out.mp4", batch_size=4, progress=False)
    assert report["audio"] == "copied (pcm_s16le)"
    samples, rate, first = _sound(tmp_path / "out.mp4")
    onset = first + np.argmax(np.abs(samples) > 1000) / rate
    assert _frame_times(tmp_path / "out.mp4")[0] == 0 and abs(onset - 1.0) < 0.01
    assert abs(len(samples) / rate - 2.0) < 0.11
    gc.disable()  # the sound's source must be closed when the call returns, not by a later gc pass
    try:
        explain_video(spec, src, tmp_path / "cut.mp4", max_frames=5, progress=False)
        assert not _descriptors_on(src)
    finally:
        gc.enable()
    samples, rate, _ = _sound(tmp_path / "cut.mp4")
    assert 0.5 <= len(samples) / rate <= 0.65 and len(read_frames(tmp_path / "cut.mp4")) == 5


@pytest.mark.parametrize("output", ["out.ts", "out.flv"])
def test_sound_a_format_cannot_carry_is_said_not_copied(tmp_path, output):
    """MPEG-TS took 16-bit PCM as private data (the report said "copied", the sound was lost);
    FLV aborted the process (SIGABRT inside FFmpeg) on 44.1 kHz PCM."""
    src = _video_with_sound(tmp_path / "in.mkv", rate=44100, seconds=0.5)
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from models import tiny_cnn; from rsp_fast.models import "
            "ModelSpec; from rsp_fast.video import explain_video; print(explain_video(ModelSpec(tiny_cnn(), 'tiny', "
            "input_size=32), sys.argv[1], sys.argv[2], progress=False)['audio'])")
    run = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / output), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)  # an abort must not take the test run with it
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("format cannot hold pcm_s16le sound")
    with av.open(str(tmp_path / output)) as c:
        assert not c.streams.audio and not c.streams.data


@pytest.mark.parametrize("output", ["out.ts", "out.mkv"])
def test_mp3_sound_is_copied_into_mpeg_ts(tmp_path, spec, output):
    """MPEG-TS's sound was told from its codec's name as PyAV gives it, the decoder's: MP3's is
    mp3float, so MP3 sound was left out of every .ts ("cannot hold mp3float sound")."""
    src = _video_with_sound(tmp_path / "in.mkv", audio_codec="libmp3lame", rate=44100, seconds=1.0)
    report = explain_video(spec, src, tmp_path / output, progress=False)
    assert report["audio"].startswith("copied")
    with av.open(str(tmp_path / output)) as c:
        assert [s.codec_context.codec.id for s in c.streams.audio] == [av.codec.Codec("mp3", "r").id]
        assert sum(1 for _ in c.demux(c.streams.audio[0])) > 20  # 1 s of 1152-sample frames at 44.1 kHz: 38


def _descriptors_on(path) -> list[str]:
    """This process's open file descriptors on ``path``."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            if os.path.realpath(os.readlink(fd)) == os.path.realpath(path):
                found.append(fd.name)
        except OSError:  # closed while listed
            pass
    return found


@pytest.mark.parametrize("name,mode,hw,rotation,size", [
    ("out.avi", "overlay", (16, 8200), None, "8200x16"), ("out.mp4", "side-by-side", (16, 8200), None, "16400x16"),
    ("out.mp4", "side-by-side", (8200, 16), 90, "16400x16")])  # stored tall, shown wide
def test_frames_too_large_for_the_encoder_are_refused_before_any_work(tmp_path, spec, name, mode, hw, rotation, size):
    """x264 takes at most 16384 pixels a side, MPEG-4 Part 2 (in .avi) 8190: the encoder's
    error came after every frame was explained, as a traceback (status 1)."""
    src = _encode(tmp_path / "wide.mp4", _frames(2, *hw), codec="libx264", rotation=rotation)
    calls = []
    first_layer = next(m for m in spec.model.modules() if not list(m.children()))
    first_layer.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(RSPError, match=f"cannot write video .*{name}'.* {size} pixels"):
        explain_video(spec, src, tmp_path / "new" / "folder" / name, mode=mode, progress=False)
    assert not calls and sorted(p.name for p in tmp_path.iterdir()) == ["wide.mp4"]  # nor the folders it made
    with pytest.raises(RSPError, match="cannot write video"):  # a format FFmpeg does not know: refused when opened
        explain_video(spec, src, tmp_path / "new" / "folder" / "out.xyz", mode=mode, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.mp4"]


def test_sound_with_a_cover_picture_is_not_a_video(tmp_path, spec):
    """An MP3 with its cover art: FFmpeg lists the picture as a video stream, which was taken for
    the video and reported "truncated: its frames end at 0.07 s of the 3.00 s it claims"."""
    path = tmp_path / "song.mp3"
    with av.open(str(path), "w") as c:
        sound = c.add_stream("libmp3lame", rate=44100)
        sound.layout = "mono"
        cover = c.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        still = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24").reformat(format="yuvj420p")
        still.pts = 0
        packets = cover.encode(still) + cover.encode()
        c.start_encoding()
        for packet in packets:
            c.mux(packet)
        for at in range(0, 44100 * 3, 1152):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, at
            for packet in sound.encode(frame):
                c.mux(packet)
        for packet in sound.encode():
            c.mux(packet)
    with pytest.raises(RSPError, match="'.*song.mp3' has no video stream \\(only a cover picture\\)"):
        explain_video(spec, path, tmp_path / "out.mp4", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.mp3"]


def _slots(path):
    """The frames an AVI's header counts (empty chunks too)."""
    with av.open(str(path)) as c:
        return c.streams.video[0].frames


def test_an_avi_output_starts_on_time(tmp_path, spec):
    """AVI keeps no presentation times: H.264 there was read back a slot late (with B-frames two),
    and with AAC sound (whose priming packet starts before 0) a slot later still, with an empty
    chunk counted as an eleventh frame."""
    moving = [np.roll(f, 3 * i, axis=1) for i, f in enumerate(_frames(1) * 24)]
    write_video(tmp_path / "out.avi", moving, fps=12)
    with av.open(str(tmp_path / "out.avi")) as c:
        types = [av.video.frame.PictureType(f.pict_type).name for f in c.decode(c.streams.video[0])]
    assert len(types) == 24 and "B" not in types, types
    assert _slots(tmp_path / "out.avi") == 24 and _frame_times(tmp_path / "out.avi") == pytest.approx([i / 12 for i in range(24)])
    # MPEG-4 Part 2 takes at most 65535 ticks a second: 119.88 fps (120000/1001) was refused (in review)
    write_video(tmp_path / "fast.avi", moving[:6], fps=Fraction(120000, 1001))
    assert _frame_times(tmp_path / "fast.avi") == pytest.approx([i * 1001 / 120000 for i in range(6)], abs=1e-5)
    for codec, rate in (("aac", 44100), ("ac3", 48000)):  # a priming packet before 0; a first packet across 0
        src = _video_with_sound(tmp_path / f"{codec}.mkv", audio_codec=codec, rate=rate, seconds=2.0, beep_at=1.0)
        with av.open(str(src)) as c:
            assert next(c.demux(audio=0)).pts < 0
        report = explain_video(spec, src, tmp_path / f"{codec}.avi", progress=False)
        assert report["audio"] == f"copied ({codec})"
        assert _slots(tmp_path / f"{codec}.avi") == 20
        assert _frame_times(tmp_path / f"{codec}.avi") == pytest.approx([i / 10 for i in range(20)])
        samples, rate, first = _sound(tmp_path / f"{codec}.avi")
        assert abs(first + np.argmax(np.abs(samples) > 0.1) / rate - 1.0) < 0.01, codec  # the tone on time
    # sound from 0.5 s before the first frame: an AVI's picture starts at its first frame, and the
    # sound with it (review: the tone played the whole lead late, 1.5 s after the first frame)
    t = np.arange(3 * 8000) / 8000
    tone = (np.where(t >= 1.5, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0) * 32767).astype(np.int16)
    src = _encode(tmp_path / "lead.mkv", _frames(20), codec="libx264", fps=10, times=[0.5 + i / 10 for i in range(20)],
                  sound=("pcm_s16le", 8000, tone, 0))
    explain_video(spec, src, tmp_path / "lead.avi", progress=False)
    samples, rate, first = _sound(tmp_path / "lead.avi")
    assert abs(first + np.argmax(np.abs(samples) > 1000) / rate - 1.0) < 0.06  # within half a 0.1 s packet
    explain_video(spec, src, tmp_path / "lead_cut.avi", max_frames=5, progress=False)  # was cut the lead late: 1.0 s
    samples, rate, _ = _sound(tmp_path / "lead_cut.avi")
    assert 0.45 <= len(samples) / rate <= 0.6 and len(read_frames(tmp_path / "lead_cut.avi")) == 5
    write_video(tmp_path / "out.mp4", moving, fps=12)  # elsewhere B-frames stay (smaller files)
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert "B" in [av.video.frame.PictureType(f.pict_type).name for f in c.decode(c.streams.video[0])]


def test_sound_the_output_cannot_hold_or_retimed_frames_are_left_out(tmp_path, spec):
    src = _video_with_sound(tmp_path / "in.mkv", audio_codec="libopus", rate=48000)
    report = explain_video(spec, src, tmp_path / "out.avi", progress=False)
    assert report["audio"] == "not copied: the avi format cannot hold opus sound"
    assert len(read_frames(tmp_path / "out.avi")) == 20  # AVI keeps no timestamps: frames at the rate
    with av.open(str(tmp_path / "out.avi")) as c:  # one slot per frame, not one per tick of a fine clock
        assert c.streams.video[0].time_base == Fraction(1, 10) and c.streams.video[0].frames == 20
    report = explain_video(spec, src, tmp_path / "out.mp4", fps=5, progress=False)
    assert report["audio"].startswith("not copied")
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert not c.streams.audio
    silent = write_video(tmp_path / "silent.mp4", _frames(3), fps=3)
    assert explain_video(spec, silent, tmp_path / "out2.mp4", progress=False)["audio"] is None


@pytest.mark.parametrize("pix_fmt,array_format,shape", [("gray", "gray", (30, 40)), ("yuva420p", "rgba", (30, 40, 4))])
def test_grey_and_alpha_videos(tmp_path, spec, pix_fmt, array_format, shape):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(3)]
    src = _encode(tmp_path / "in.mkv", frames, pix_fmt, array_format)
    report = explain_video(spec, src, tmp_path / "out.mp4", progress=False)
    assert report["totals"]["frames"] == 3


def _rotated_video(path, rotation: int):
    """A 32×64 (landscape) H.264 video tagged to be shown turned by ``rotation`` degrees
    counter-clockwise, as phones store portrait videos; a white block in its top-left corner."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:8, :16] = 255
    return _encode(path, [img] * 3, "yuv420p", "rgb24", fps=5, codec="libx264", rotation=rotation)


# where players show the block (rows, columns of the displayed frame): what ffmpeg's
# autorotation gives for these files (checked with `ffmpeg -i in.mp4 frame.png`)
@pytest.mark.parametrize("rotation,shape,block", [(90, (64, 32), (slice(48, 64), slice(0, 8))),
                                                  (-90, (64, 32), (slice(0, 16), slice(24, 32))),
                                                  (180, (32, 64), (slice(24, 32), slice(48, 64)))])
def test_videos_with_a_display_rotation_are_explained_upright(tmp_path, spec, rotation, shape, block):
    from rsp_fast.video.io import decode_batches
    src = _rotated_video(tmp_path / "phone.mp4", rotation)
    frames = next(decode_batches(src, 8)).frames
    assert frames.shape == (3, *shape, 3)
    white = frames[0, ..., 0] > 128
    assert white[block].all() and white.sum() == white[block].size
    explain_video(spec, src, tmp_path / "out.mp4", progress=False)
    info = probe(tmp_path / "out.mp4")
    assert (info.height, info.width) == shape


def _corrupt_inputs(tmp_path):
    good = write_video(tmp_path / "good.mp4", _frames(6), fps=6)
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    mkv = _encode(tmp_path / "good.mkv", _frames(6), "yuv420p", "rgb24").read_bytes()
    (tmp_path / "truncated.mkv").write_bytes(mkv[: len(mkv) * 2 // 3])
    # with a sound track, Matroska's header keeps the longer stream's duration only: each stream's is a tag
    with_sound = _video_with_sound(tmp_path / "sound.mkv", seconds=3.0).read_bytes()
    (tmp_path / "truncated_sound.mkv").write_bytes(with_sound[: len(with_sound) // 2])
    avi = _encode(tmp_path / "good.avi", _frames(24), codec="mpeg4").read_bytes()  # AVI: no timestamps, a frame count
    (tmp_path / "truncated.avi").write_bytes(avi[: len(avi) * 3 // 5])
    (tmp_path / "text.mp4").write_text("not a video at all")
    c = av.open(str(tmp_path / "empty.mkv"), "w")  # a video stream that holds no frame
    s = c.add_stream("ffv1", rate=5)
    s.width, s.height, s.pix_fmt = 32, 32, "gray"
    c.start_encoding()  # writes the header
    c.close()
    assert (tmp_path / "empty.mkv").exists()
    # an MP4 whose index (its moov box, written last) was cut inside its track's box: the stream's
    # kind is never read
    indexed = _encode(tmp_path / "index_last.mp4", _frames(6), codec="libx264").read_bytes()
    moov = indexed.rfind(b"moov") - 4
    assert moov > len(indexed) // 2  # the index after the frames
    (tmp_path / "index_cut.mp4").write_bytes(indexed[: moov + 200])
    from PIL import Image
    pictures = [Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)) for i in range(3)]
    pictures[0].save(tmp_path / "animated.webp", save_all=True, append_images=pictures[1:], duration=100)


@pytest.mark.parametrize("name,message", [
    ("missing.mp4", "does not exist"),
    ("text.mp4", "not a video or corrupt"),
    ("truncated.mp4", "not a video or corrupt"),
    ("truncated.mkv", "truncated"),
    ("truncated_sound.mkv", "truncated: its frames end at"),
    ("truncated.avi", "truncated: its frames end at 1.[0-9]+ s of the 2.33 s it claims"),
    ("empty.mkv", "cannot read video"),
    ("index_cut.mp4", "holds no stream FFmpeg can name: truncated, or not a video"),
    ("animated.webp", "FFmpeg decodes no animated WebP"),
])
def test_bad_videos_fail_cleanly(tmp_path, spec, name, message):
    _corrupt_inputs(tmp_path)
    dst = tmp_path / "out.mp4"
    with pytest.raises(RSPError, match=message):
        explain_video(spec, tmp_path / name, dst, progress=False)
    assert _only_output(tmp_path, "out") == []


def test_failure_midway_leaves_no_output(tmp_path, spec, monkeypatch):
    src = write_video(tmp_path / "in.mp4", _frames(8), fps=8)
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"previous result")  # an existing output is kept until a run completes
    calls = []
    real = rsp_fast.RSP.explain

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(rsp_fast.RSP, "explain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        explain_video(spec, src, dst, batch_size=2, progress=False)
    assert dst.read_bytes() == b"previous result"
    assert _only_output(tmp_path, "out") == ["out.mp4"]
    assert not [t for t in threading.enumerate() if isinstance(t, _Stage)]  # decoder and encoder have ended


@pytest.mark.parametrize("suffix", [".ts", ".mpg"])
def test_formats_ffmpeg_cannot_vouch_for_are_tried(tmp_path, spec, suffix):
    """PyAV lists no codec for MPEG-TS or MPEG-PS (FFmpeg cannot say), which refused them as
    unable to hold H.264; one frame encoded in memory shows they can."""
    src = write_video(tmp_path / "in.mp4", _frames(3), fps=3)
    report = explain_video(spec, src, tmp_path / f"out{suffix}", fps=3, progress=False)
    assert len(read_frames(tmp_path / f"out{suffix}")) == 3
    assert report["audio"] is None  # no sound to copy: nothing said of it, though --fps retimes


def test_a_bad_argument_leaves_no_file_open(tmp_path, spec):
    """A target that is not a class fails before the source's sound is opened for copying."""
    src = _video_with_sound(tmp_path / "in.mkv")
    gc.disable()  # what a call leaves open must be closed when it returns, not by a later gc pass
    try:
        with pytest.raises(RSPError, match="target must be one class"):
            explain_video(spec, src, tmp_path / "out.mp4", target=2.5, progress=False)
        assert not _descriptors_on(src)
    finally:
        gc.enable()
    assert _only_output(tmp_path, "out") == []


def test_an_encoder_failure_on_a_long_video_ends_the_run(tmp_path, spec, monkeypatch):
    """When the encoder dies, the decoder must not wait forever for room in its queue (it did
    once more batches were decoded than the queues hold)."""
    import threading
    from rsp_fast.video import io

    src = write_video(tmp_path / "in.mp4", _frames(12), fps=12)

    def broken(self, *a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(io.Encoder, "write", broken)
    outcome = []
    run = threading.Thread(target=lambda: outcome.append(_raised(explain_video, spec, src, tmp_path / "out.mp4",
                                                                 batch_size=1, progress=False)), daemon=True)
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "explain_video hung after its encoder failed"
    assert isinstance(outcome[0], OSError) and "disk gone" in str(outcome[0])
    assert _only_output(tmp_path, "out") == []


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except BaseException as exc:
        return exc
    return None


def test_a_model_that_outputs_nan_is_named(tmp_path):
    model = tiny_cnn()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    src = write_video(tmp_path / "in.mp4", _frames(3), fps=3)
    with pytest.raises(RSPError, match="not finite"):
        explain_video(model, src, tmp_path / "out.mp4", progress=False)
    assert _only_output(tmp_path, "out") == []


@pytest.mark.parametrize("name, signals", [("SIGTERM", 1), ("SIGTERM", 2), ("SIGINT", 1)],
                         ids=["sigterm", "sigterm-twice", "ctrl-c"])  # twice: the second one during the cleanup
def test_a_stopping_signal_leaves_no_temporary_file_and_ends_the_process_by_that_signal(tmp_path, name, signals):
    """The process dies of the signal after its clean-up, as a shell loop needs to stop (a
    second signal once the handlers are restored ends it the same way)."""
    import signal
    import time

    signum = getattr(signal, name)
    src = write_video(tmp_path / "in.mp4", _frames(400, 64, 64), fps=25)
    (tmp_path / "out.mp4").write_bytes(b"previous result")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    # Ctrl-C as a terminal delivers it: a child of a shell's background job (`pytest &`) starts
    # with SIGINT ignored, and Python then leaves it ignored
    proc = subprocess.Popen([sys.executable, "-m", "rsp_fast", "video", str(src), "-o", "out.mp4", "--model",
                             "models:tiny_cnn", "--batch-size", "1", "--quiet"], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.mp4.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # until the encoder has opened its temporary file
    for _ in range(signals):
        proc.send_signal(signum)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signum, err
    assert "interrupted" in err and "Traceback" not in err
    assert _only_output(tmp_path, "out") == ["out.mp4"] and (tmp_path / "out.mp4").read_bytes() == b"previous result"


def test_a_run_without_stderr_works_and_a_signal_still_ends_it(tmp_path):
    """With fd 2 closed at start-up (`2>&-`, a daemon) Python sets sys.stderr to None: the
    progress bar's isatty() on it failed every video and demo run without --quiet (status 1,
    nothing written), and a SIGTERM then ended the process with status 1, not by the signal."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(rsp_fast.__file__).resolve().parents[1]), str(TESTS)])}
    closed = dict(cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(2))
    src = write_video(tmp_path / "in.mp4", _frames(4), fps=6)
    proc = subprocess.run([sys.executable, "-m", "rsp_fast", "video", str(src), "-o", "done.mp4", "--model",
                           "models:tiny_cnn", "--batch-size", "2"], **closed)
    assert proc.returncode == 0 and proc.stdout.startswith("wrote done.mp4: 4 frames")
    assert len(read_frames(tmp_path / "done.mp4")) == 4
    src = write_video(tmp_path / "long.mp4", _frames(400, 64, 64), fps=25)
    proc = subprocess.Popen([sys.executable, "-m", "rsp_fast", "video", str(src), "-o", "out.mp4", "--model",
                             "models:tiny_cnn", "--batch-size", "1", "--quiet"], **closed)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.mp4.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # until the encoder has opened its temporary file
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and out == ""  # the "interrupted" line went to stdout
    assert _only_output(tmp_path, "out") == []


def test_an_interrupted_wait_for_a_stage_still_waits_for_its_end():
    """Thread.join, interrupted by a signal, takes a running thread for ended (CPython 3.11):
    the encoder was then closed under the writer (a crash at a second SIGTERM)."""
    import signal

    release, stop, finished, interrupts = threading.Event(), threading.Event(), [], []

    def work(stage):
        release.wait()
        finished.append(True)

    def interrupt(signum, frame):
        interrupts.append(signum)
        if len(interrupts) <= 2:  # two interrupts, the stage is let go at the second
            if len(interrupts) == 2:
                release.set()
            raise KeyboardInterrupt

    stage = _Stage(work, stop)
    stage.start()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        _to_the_end(stage.wait_to_end)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(interrupts) >= 2 and finished == [True]


def test_the_cleanup_goes_on_through_further_interrupts():
    steps = []

    def cleanup():
        steps.append(len(steps))
        if len(steps) < 3:
            raise KeyboardInterrupt  # as a second Ctrl-C in the middle of it
    _to_the_end(cleanup)
    assert steps == [0, 1, 2]


def _cli(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "rsp_fast.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=env)


def test_cli_video_with_report(tmp_path):
    src = _video_with_sound(tmp_path / "in.mkv", seconds=0.5)
    proc = _cli(tmp_path, "video", src, "-o", tmp_path / "o" / "out.mp4", "--model", "models:tiny_cnn",
                "--batch-size", "2", "--report", tmp_path / "r.json", "--side-by-side", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["frames"]) == 5 and report["totals"]["frames"] == 5
    assert set(report["totals"]) >= {"frames", "decode_s", "attribute_s", "encode_s", "fps"}
    assert report["audio"] == "copied (pcm_s16le)" and "sound copied (pcm_s16le)" in proc.stdout
    assert len(read_frames(tmp_path / "o" / "out.mp4")) == 5


def test_cli_video_with_a_clip_model_from_a_factory_spec(tmp_path):
    """``--model package.module:factory`` may return a ModelSpec (input size, class names): here
    a video classifier, whose clips of --batch-size frames label every frame."""
    src = write_video(tmp_path / "in.mp4", _frames(5), fps=5)
    proc = _cli(tmp_path, "video", src, "-o", tmp_path / "out.mp4", "--model", "models:tiny_clip_spec",
                "--batch-size", "4", "--report", tmp_path / "r.json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    frames = json.loads((tmp_path / "r.json").read_text())["frames"]
    assert len(frames) == 5 and {r["name"] for r in frames} <= {"walk", "run", "jump"}
    assert len({r["label"] for r in frames[:4]}) == 1  # one clip, one label
    assert len(read_frames(tmp_path / "out.mp4")) == 5


@pytest.mark.parametrize("args,message", [
    (["video", "nothere.mp4", "-o", "out.mp4"], "does not exist"),
    (["video", "{text}", "-o", "out.mp4"], "not a video"),
    (["video", "{good}", "-o", "out.mp4", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--weights", "{weights}"], "do not match"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--target", "7"], "class 7 is out of range"),
    (["video", "{good}", "-o", "out.gif", "--model", "models:tiny_cnn"], "a .gif cannot hold libx264 video"),
    (["video", "{good}", "-o", "out.wmv", "--model", "models:tiny_cnn"], "a .wmv (asf) does not keep each frame's time"),
    (["video", "{good}", "-o", "out.yuv", "--model", "models:tiny_cnn"], "a .yuv (rawvideo) does not keep"),
    (["video", "{good}", "-o", "out.h264", "--model", "models:tiny_cnn"], "a .h264 (h264) does not keep"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--fps", "-5"], "frame rate must be from 1/1001"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--fps", "1e-9"], "frame rate must be from 1/1001 to 1000 frames per second, not 1e-9"),
    (["video", "{good}", "-o", "out.mp4", "--model", ":"], "model ':': give efficientnet_lite0"),
    (["video", "{good}", "-o", "out.mp4", "--model", ".models:tiny_cnn"], "model '.models:tiny_cnn': give"),
    (["video", "{good}", "-o", "out.mp4", "--model", "boom:net"], "cannot import model factory 'boom:net': RuntimeError: boom"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--weights", "{numbers}"], "not a tensor"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--fps", "nan"], "not a frame rate: 'nan'"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--fps", "0"], "frame rate must be from 1/1001 to 1000 frames per second, not 0 "),
    (["video", "{good}", "-o", "{good}", "--model", "models:tiny_cnn"], "is the input video"),
    (["video", "{good}", "-o", "out.mp4", "--report", "{good}"], "report '{good}' is the input video"),
    (["video", "{good}", "-o", "out.mp4", "--report", "out.mp4"], "report 'out.mp4' is the output video"),
    (["video", "{good}", "-o", "out.mp4", "--report", ""], "report: the path is empty"),
    (["video", "{good}", "-o", "", "--model", "models:tiny_cnn"], "output video: the path is empty"),
    (["video", "{good}", "-o", ".", "--model", "models:tiny_cnn"], "is a folder"),
    (["video", "{good}", "-o", "outdir/", "--model", "models:tiny_cnn"], "is a folder"),
    (["video", "{good}", "-o", "{fifo}", "--model", "models:tiny_cnn"], "is not a regular file"),
    (["video", "{good}", "-o", "{text}/out.mp4", "--model", "models:tiny_cnn"], "is a file, not a folder"),
    (["video", "{folder}", "-o", "out.mp4"], "is a folder, not a file"),
    (["video", "{fifo}", "-o", "out.mp4"], "is not a regular file (a device, pipe or socket)"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--weights", "{folder}"], "weights file '"),
    pytest.param(["video", "{good}", "-o", "/proc/out.mp4", "--model", "models:tiny_cnn"], "output video '/proc/out.mp4'",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")),  # root may write /proc
    pytest.param(["video", "{good}", "-o", "/proc/new/out.mp4", "--model", "models:tiny_cnn"], "cannot create a file in the folder '/proc'",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")),  # a folder to create there
    pytest.param(["video", "{good}", "-o", "out.mp4", "--model", "models:tiny_cnn", "--report", "/proc/new/r.json"], "report '/proc/new/r.json'",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc here")),
    (["video", "{good}", "-o", "out.mp4", "--device", "meta"], "runs on cpu or cuda"),
    (["video", "{good}", "-o", "out.mp4", "--model", "models:failing_factory"], "model factory 'models:failing_factory' failed"),
])
def test_cli_video_errors_are_one_line(tmp_path, args, message):
    import torch
    good = write_video(tmp_path / "good.mp4", _frames(3), fps=3)
    (tmp_path / "text.mp4").write_text("hello")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "w.pt")
    torch.save({"0.weight": 1}, tmp_path / "numbers.pt")
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom')\n")  # a factory module failing on import
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "folder.mp4").mkdir()
    fill = {"good": good, "text": tmp_path / "text.mp4", "weights": tmp_path / "w.pt", "fifo": tmp_path / "pipe.mp4",
            "folder": tmp_path / "folder.mp4", "numbers": tmp_path / "numbers.pt"}
    proc = _cli(tmp_path, *[a.format(**fill) for a in args])
    assert proc.returncode == 2
    assert message.format(**fill) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob("*out*"))
    assert good.stat().st_size > 0 and len(read_frames(good)) == 3  # the input untouched
    assert (tmp_path / "pipe.mp4").is_fifo()


def test_an_output_through_a_link_replaces_the_link_target(tmp_path, spec):
    src = write_video(tmp_path / "in.mp4", _frames(2), fps=2)
    (tmp_path / "real.mp4").write_bytes(b"old")
    (tmp_path / "link.mp4").symlink_to("real.mp4")
    explain_video(spec, src, tmp_path / "link.mp4", progress=False)
    assert (tmp_path / "link.mp4").is_symlink() and len(read_frames(tmp_path / "real.mp4")) == 2


def test_explain_video_leaves_a_plain_module_as_it_was(tmp_path):
    model = tiny_cnn().train()
    src = write_video(tmp_path / "in.mp4", _frames(2), fps=2)
    report = explain_video(model, src, tmp_path / "out.mp4", progress=False)
    assert report["totals"]["frames"] == 2 and report["model"] == "Sequential"
    assert model.training and all(m.training for m in model.modules())


def _muxed_video(path, fmt, codec, times, fps, size=(32, 48), pix_fmt="yuv420p", time_base=None, images=None,
                 tag=lambda stream: None):
    """Frames at ``times`` (seconds; distinct ones, or ``images``), muxed as ``fmt``, the stream
    given ``tag`` first (a display matrix, a sample aspect ratio)."""
    clock = time_base or Fraction(1, 1000)
    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream(codec, rate=fps)
    s.height, s.width = size
    s.pix_fmt = pix_fmt
    s.codec_context.time_base = clock
    tag(s)
    for t, img in zip(times, images or _frames(len(times), *size, seed=3)):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = round(Fraction(t) / clock), clock
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def _tagged_still(path, img, tag):
    """Two frames of ``img`` in H.264 (FFV1 in Matroska keeps no aspect ratio), tagged by ``tag``."""
    return _muxed_video(path, None, "libx264", [0, 0.2], 5, img.shape[:2], images=[img, img], tag=tag)


# what ffmpeg's autorotation shows for display matrices that mirror (QuickTime's Flip Horizontal,
# a front camera's video) or turn and mirror: the block's place in the shown 32×64 or 64×32 frame
@pytest.mark.parametrize("matrix,shape,block", [
    ([-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30], (32, 64), (slice(0, 8), slice(48, 64))),  # mirrored left-right
    ([65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30], (32, 64), (slice(24, 32), slice(0, 16))),  # upside down
    ([0, 65536, 0, 65536, 0, 0, 0, 0, 1 << 30], (64, 32), (slice(0, 16), slice(0, 8))),  # transposed
])
def test_videos_with_a_mirroring_display_matrix_are_shown_as_players_show_them(tmp_path, matrix, shape, block):
    from rsp_fast.video.io import decode_batches
    img = np.zeros((32, 64, 3), np.uint8)
    img[:8, :16] = 255
    src = _tagged_still(tmp_path / "mirrored.mp4", img, lambda s: s.set_display_matrix(matrix))
    frames = next(decode_batches(src, 8)).frames
    assert frames.shape == (2, *shape, 3)
    white = frames[0, ..., 0] > 128
    assert white[block].all() and white.sum() == white[block].size


def test_anamorphic_videos_are_explained_at_the_aspect_ratio_they_are_shown_at(tmp_path, spec):
    """A sample aspect ratio of 2:1 (each stored pixel shown twice as wide: DV, DVD, HDV): the
    frames are stretched to the shown width before the model sees them, and the output keeps the
    shape the user saw."""
    from rsp_fast.video.io import decode_batches
    img = np.zeros((24, 32, 3), np.uint8)
    img[:, :8] = 255  # the left quarter

    def anamorphic(s):
        s.codec_context.sample_aspect_ratio = s.sample_aspect_ratio = Fraction(2, 1)
    src = _tagged_still(tmp_path / "wide.mkv", img, anamorphic)
    frames = next(decode_batches(src, 8)).frames
    assert frames.shape == (2, 24, 64, 3)
    white = frames[0, 12, :, 0] > 128
    assert white[:14].all() and not white[18:].any()  # still the left quarter, now 16 pixels wide
    explain_video(spec, tmp_path / "wide.mkv", tmp_path / "out.mp4", progress=False)
    info = probe(tmp_path / "out.mp4")
    assert (info.height, info.width) == (24, 64)


def _decoded_times(path):
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


@pytest.mark.parametrize("name,fmt,codec,times,fps,extra", [
    # an MPEG program stream (.mpg, .vob) whose clock starts near 0.5 s, as every such stream's does
    ("clip.mpg", "mpeg", "mpeg1video", [i / 25 for i in range(8)], 25, dict(time_base=Fraction(1, 25))),
    # raw DV, whose "average rate" is its time base (60000)
    ("tape.dv", "dv", "dvvideo", [i / 25 for i in range(4)], 25, dict(time_base=Fraction(1, 25), size=(576, 720))),
    # a variable frame rate (no output rate to check) in ASF (screen recorders) and in AVI, whose
    # skipped chunks hold the gaps
    ("screen.wmv", "asf", "wmv2", [0, 0.04, 0.5, 0.52, 1.3, 1.34], None, {}),
    ("capture.avi", "avi", "mpeg4", [i / 30 for i in (0, 1, 2, 5, 6, 7, 8, 12)], None, dict(time_base=Fraction(1, 30))),
])
def test_videos_keep_their_own_timing_in_every_container(tmp_path, spec, name, fmt, codec, times, fps, extra):
    """Each frame keeps the time FFmpeg reads for it (the report on the input's clock, the output
    from 0), the output decodes to every frame, and none is refused as truncated."""
    src = _muxed_video(tmp_path / name, fmt, codec, times, fps or 30, **extra)
    expected = _decoded_times(src)
    report = explain_video(spec, src, tmp_path / "out.mp4", progress=False)
    got = [f["time"] for f in report["frames"]]
    assert got == pytest.approx(expected, abs=1e-6)
    assert fps is None or report["output_fps"] == fps
    out = _decoded_times(tmp_path / "out.mp4")
    assert out == pytest.approx([t - expected[0] for t in expected], abs=2e-3)


def test_heat_map_videos_are_tagged_as_the_colours_they_are_converted_with(tmp_path):
    """The output's YUV is BT.709's and says so (untagged, players guess by the frame's size):
    pure red, green and blue come back as themselves by BT.709's formulas, and through the
    decoder."""
    rgb = np.zeros((24, 48, 3), np.uint8)
    rgb[:, :16, 0] = rgb[:, 16:32, 1] = rgb[:, 32:, 2] = 255
    path = write_video(tmp_path / "colours.mp4", [rgb, rgb], fps=5)
    with av.open(str(path)) as c:
        context = c.streams.video[0].codec_context
        assert (context.colorspace, context.color_primaries, context.color_trc, context.color_range) == (1, 1, 1, 1)
        frame = next(c.decode(video=0))
    y, u, v = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width].astype(float)
               for p in frame.planes)
    for column, colour in ((4, (255, 0, 0)), (24, (0, 255, 0)), (44, (0, 0, 255))):
        Y, U, V = (y[12, column] - 16) / 219, (u[6, column // 2] - 128) / 224, (v[6, column // 2] - 128) / 224
        R, B = Y + 1.5748 * V, Y + 1.8556 * U
        G = (Y - 0.2126 * R - 0.0722 * B) / 0.7152
        assert np.allclose(np.clip([R, G, B], 0, 1) * 255, colour, atol=6)
    assert np.abs(read_frames(path)[0].astype(int) - rgb).max() <= 6


def test_an_avi_keeps_its_colours():
    """An AVI's MPEG-4 Part 2 keeps no colour tag: converted with BT.709's matrix, its frames
    were decoded with BT.601's, (200, 40, 60) coming back as (185, 20, 60)."""
    import tempfile

    rgb = np.full((32, 32, 3), (200, 40, 60), np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        back = read_frames(write_video(Path(folder) / "flat.avi", [rgb, rgb], fps=5))[0]
    assert np.abs(back.astype(int) - rgb).max() <= 4


def test_a_first_frame_before_the_sources_start_opens_the_output_at_zero(tmp_path):
    """Frames timed before the container's start (a stream whose first frame precedes the time
    the container reports): the output starts at 0 and keeps the frames' spacing, rather than
    writing negative timestamps that leave no frame decodable."""
    from rsp_fast.video.io import Encoder
    encoder = Encoder(tmp_path / "early.mp4", Fraction(10), start=1.0)
    for i, img in enumerate(_frames(4, 16, 16)):
        encoder.write(img, 0.5 + i / 10)
    encoder.commit()
    assert _decoded_times(tmp_path / "early.mp4") == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=1e-3)
