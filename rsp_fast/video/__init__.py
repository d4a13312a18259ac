"""Heat-map videos: ``explain_video(model, src, dst, **options)`` streams a video through RSP;
``explain_frames(model, frames, **options)`` explains RGB frames from any source."""
from .demo_clip import make_demo_clip
from .frames import FrameExplanation, explain_frames
from .pipeline import explain_video

__all__ = ["explain_video", "explain_frames", "FrameExplanation", "make_demo_clip"]
