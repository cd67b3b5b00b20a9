"""Video sources (a folder of frames, an animated GIF, an MP4 through PyAV): uniform sampling,
the fps the model is told, and clear errors for what cannot be read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.media import VideoError, load_video, sample_indices
from runtime.preprocess import load_image
from runtime.run import cli


@pytest.fixture(scope="module")
def frames(photo_paths) -> list[Image.Image]:
    """12 frames panning across a real photo."""
    im = load_image(photo_paths[1])
    return [im.crop((x, 0, x + 160, 120)) for x in range(0, 12 * 20, 20)]


def test_sample_indices() -> None:
    assert sample_indices(12, 4).tolist() == [0, 4, 7, 11]  # first and last included
    assert sample_indices(3, 8).tolist() == [0, 1, 2]  # never more than the clip has
    with pytest.raises(VideoError, match="--frames"):
        sample_indices(10, 0)


def test_folder_gif_and_mp4_agree(frames, tmp_path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"{i:02d}.png")
    a = load_video(folder, 4, fps=6.0)
    assert len(a) == 4 and a.fps == pytest.approx(4 / 12 * 6.0)
    np.testing.assert_array_equal(np.asarray(a.frames[1]), np.asarray(frames[4]))

    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    b = load_video(gif, 4)
    assert len(b) == 4 and b.fps == pytest.approx(4 / 12 * 10.0)  # 100 ms a frame

    av = pytest.importorskip("av", reason="PyAV is the optional video extra")
    mp4 = tmp_path / "clip.mp4"
    with av.open(str(mp4), "w") as out:
        stream = out.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(f)))
        out.mux(stream.encode())
    c = load_video(mp4, 4)
    assert len(c) == 4 and c.fps == pytest.approx(4 / 12 * 6.0)
    # lossy, but the same frames: each sampled frame is closest to its source frame
    for got, want in zip(c.frames, [frames[i] for i in (0, 4, 7, 11)], strict=True):
        err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).mean()
        assert err < 12, err


@pytest.mark.parametrize("case", ["missing", "empty folder", "not a video", "bad frames"])
def test_bad_video_is_a_clear_error(llava_bundle, tmp_path, capsys, case) -> None:
    path = tmp_path / "v"
    if case == "empty folder":
        path.mkdir()
    elif case == "not a video":
        path = tmp_path / "v.mp4"
        path.write_bytes(b"\x00not a video")
    elif case == "bad frames":
        path = tmp_path / "v.gif"
        path.write_bytes(b"GIF89a broken")
    argv = ["-m", str(llava_bundle("16norm")), "--video", str(path), "-p", "Go?", "--provider",
            "cpu"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err


def test_frames_flag_checked(llava_bundle, tmp_path, capsys) -> None:
    argv = ["-m", str(llava_bundle("16norm")), "--video", str(tmp_path), "--frames", "0", "-p",
            "Go?"]  # fmt: skip
    assert cli(argv) == 2
    assert "--frames must be >= 1" in capsys.readouterr().err
