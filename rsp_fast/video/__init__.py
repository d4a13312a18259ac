"""Heat-map videos: ``explain_video(model, src, dst, **options)`` streams a video through RSP."""
from .demo_clip import make_demo_clip
from .pipeline import explain_video

__all__ = ["explain_video", "make_demo_clip"]
