"""Several images and videos in one prompt: the media items of a row, and video frame sampling.

    -i a.jpg -i b.jpg --one-prompt   ─► one row: [Image, Image]
    --video clip.mp4 --frames 8      ─► one row: [Video(8 frames, fps)]
    a row ─► family prompt: LLaVA one image block per image / frame; Qwen2.5-VL an image block
             per image, one video block per video (K tokens per temporal slice of 2 frames)

Videos come from a folder of frames (sorted by name), an animated GIF/WebP/APNG (Pillow), or a
video file decoded with PyAV (the optional `video` extra: `pip install av`). F frames are taken
uniformly over the clip (first and last included), as qwen-vl-utils and transformers sample; the
fps the model is told is F / duration of the clip, so time positions stay true to the clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from runtime.preprocess import ImageError, load_image, to_rgb

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg"}
DEFAULT_FOLDER_FPS = 2.0  # a folder of frames has no clock: Qwen2.5-VL's default sampling rate
IMAGE_MARKER = "<image>"  # where a -p text places an image itself (both families)


class VideoError(ImageError):
    """A video that cannot be read or sampled; the message names the fix."""


@dataclass(frozen=True)
class Video:
    """F sampled frames (RGB, one size) and the rate they were sampled at (frames / s)."""

    frames: tuple[Image.Image, ...]
    fps: float
    source: str = ""

    def __len__(self) -> int:
        return len(self.frames)


def sample_indices(total: int, frames: int) -> np.ndarray:
    """`frames` indices spread uniformly over [0, total - 1], first and last included."""
    if frames < 1:
        raise VideoError(f"--frames must be >= 1, got {frames}")
    if total < 1:
        raise VideoError("the video has no frames; pass a video with at least one frame")
    return np.linspace(0, total - 1, min(frames, total)).round().astype(np.int64)


def _video(frames: list[Image.Image], total: int, rate: float, src: str) -> Video:
    """The sampled `frames` of a clip of `total` frames at `rate` frames/s."""
    picked = [to_rgb(f) for f in frames]
    if any(f.size != picked[0].size for f in picked):
        raise VideoError(f"{src}: frames differ in size; resize them to one size first")
    # qwen-vl-utils' sample_fps: F frames over a clip of total / rate seconds
    return Video(tuple(picked), len(picked) / total * rate, src)


def load_video(path: Path, frames: int, fps: float | None = None) -> Video:
    """`frames` frames of a folder, an animated image or a video file. `fps` overrides the clip's
    frame rate (a folder's default is DEFAULT_FOLDER_FPS)."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"video {path} does not exist; pass a video file or a folder of frames")
    if fps is not None and not fps > 0:
        raise VideoError(f"--fps must be > 0, got {fps}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        idx = sample_indices(len(files), frames)
        picked = [load_image(files[i]) for i in idx]
        return _video(picked, len(files), fps or DEFAULT_FOLDER_FPS, str(path))
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _decode_av(path, frames, fps)
    return _animated(path, frames, fps)


def _animated(path: Path, frames: int, fps: float | None) -> Video:
    try:
        with Image.open(path) as im:
            total = getattr(im, "n_frames", 1)
            ms = sum(f.info.get("duration", 0) for f in ImageSequence.Iterator(im))
            picked = []
            for i in sample_indices(total, frames):
                im.seek(int(i))
                picked.append(to_rgb(im.copy()))
    except (OSError, ValueError, EOFError) as e:
        raise VideoError(
            f"{path} is neither a folder of frames, an animated image nor a video file "
            f"({', '.join(sorted(VIDEO_SUFFIXES))}): {e}"
        ) from e
    rate = fps or (total / (ms / 1e3) if ms > 0 else DEFAULT_FOLDER_FPS)
    return _video(picked, total, rate, str(path))


def _decode_av(path: Path, frames: int, fps: float | None) -> Video:
    try:
        import av  # the optional `video` extra
    except ImportError as e:
        raise VideoError(
            f"{path}: decoding video files needs PyAV (pip install 'svdprune-onnx[video]' or "
            "pip install av); or pass a folder of frames or an animated GIF"
        ) from e
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or sum(1 for _ in container.decode(stream))
            want = set(sample_indices(total, frames).tolist())
            container.seek(0)
            picked = [f.to_image() for i, f in enumerate(container.decode(stream)) if i in want]
    except (av.FFmpegError, IndexError, OSError) as e:
        raise VideoError(f"{path}: cannot decode a video stream ({e}); pass another file") from e
    if not picked:
        raise VideoError(f"{path}: no frame could be decoded; pass another file")
    return _video(picked, total, fps or rate or DEFAULT_FOLDER_FPS, str(path))
