"""Images of served requests: a base64 data URI, or a file under --allowed-dir; never the network.

    image_url ─► load_url ─► bytes (checked against ImageLimits before decoding)
              ─► decode_image: runtime.preprocess.load_image's rules (EXIF orientation, RGB
                 conversion, decoder errors), from bytes, with the server's pixel limit

Refusals are RequestErrors: 400 for what cannot be used, 413 for what is over the limits.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from runtime.preprocess import _DECODE_ERRORS, _upright, to_rgb
from runtime.serve_request import RequestError, bad


@dataclass(frozen=True)
class ImageLimits:
    """What a request may make the server read: bytes and pixels per image, folders for paths."""

    max_bytes: int = 20 * 2**20  # OpenAI's per-image limit
    max_pixels: int = 36_000_000  # a 6000 x 6000 photo (decoded: 3 bytes per pixel)
    allowed_dirs: tuple[Path, ...] = ()  # resolved; empty: local paths are refused

    @property
    def max_request_bytes(self) -> int:
        """A body holding one base64 image (4/3 of its bytes) plus 1 MiB of text."""
        return self.max_bytes * 4 // 3 + 2**20


def load_url(url: str, limits: ImageLimits, param: str = "messages") -> Image.Image:
    """An image_url's image: a base64 data URI, or a file under an allowed folder."""
    if url.startswith("data:"):
        return decode_image(_data_uri_bytes(url, limits, param), limits, "the data URI", param)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise bad(f"file URI host {parts.netloc!r} is not this machine", param,
                      "invalid_image_url")  # fmt: skip
        return _load_file(Path(unquote(parts.path)), limits, param)
    if scheme:
        raise bad(f"{scheme}: URLs are not fetched (the server never uses the network); send the "
                  "image as a data URI (data:image/jpeg;base64,...)", param,
                  "unsupported_url")  # fmt: skip
    return _load_file(Path(url), limits, param)


def _data_uri_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    head, comma, payload = url.partition(",")
    media = head[len("data:") :].split(";")
    if not comma or not media[0].startswith("image/") or "base64" not in media[1:]:
        raise bad("broken data URI: expected data:image/<type>;base64,<data>", param,
                  "invalid_image_url")  # fmt: skip
    payload = "".join(payload.split())  # some clients wrap base64 lines
    if len(payload) // 4 * 3 > limits.max_bytes + 2:
        raise too_large(f"the data URI holds ~{len(payload) // 4 * 3} bytes", limits, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"broken data URI: its base64 does not decode ({e})", param,
                  "invalid_image_url") from e  # fmt: skip


def _load_file(path: Path, limits: ImageLimits, param: str) -> Image.Image:
    if not limits.allowed_dirs:
        raise bad("local image paths are off on this server (start it with --allowed-dir DIR); "
                  "send the image as a data URI", param, "file_not_allowed")  # fmt: skip
    if not path.is_absolute():
        raise bad(f"image path {str(path)!r} must be absolute", param, "file_not_allowed")
    real = path.resolve()  # symlinks resolved before the check: a link cannot lead outside
    if not any(real.is_relative_to(d) for d in limits.allowed_dirs):
        raise bad(f"{path} is outside the folders this server may read (--allowed-dir)", param,
                  "file_not_allowed")  # fmt: skip
    if not real.is_file():
        raise bad(f"image file {path} does not exist", param, "invalid_image")
    if real.stat().st_size > limits.max_bytes:
        raise too_large(f"{path} is {real.stat().st_size} bytes", limits, param)
    return decode_image(real.read_bytes(), limits, str(path), param)


def decode_image(data: bytes, limits: ImageLimits, what: str, param: str) -> Image.Image:
    """RGB with the EXIF orientation applied, by runtime.preprocess.load_image's rules."""
    if not data:
        raise bad(f"{what} is empty (0 bytes)", param, "invalid_image")
    if len(data) > limits.max_bytes:
        raise too_large(f"{what} is {len(data)} bytes", limits, param)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its MAX_IMAGE_PIXELS; the server's own limit decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only
                if im.width * im.height > limits.max_pixels:
                    raise too_large(f"{what} is {im.width}x{im.height} pixels", limits, param)
                im.load()  # decodes now: truncated or corrupt data fails here
                image = _upright(im)
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise too_large(f"{what} ({e})", limits, param) from e
    except _DECODE_ERRORS as e:
        raise bad(f"{what} is not a readable image ({e}); send a JPEG, PNG or WebP", param,
                  "invalid_image") from e  # fmt: skip
    return to_rgb(image)


def too_large(what: str, limits: ImageLimits, param: str) -> RequestError:
    return RequestError(
        413,
        f"{what}, over this server's limit of {limits.max_bytes} bytes and "
        f"{limits.max_pixels / 1e6:.1f} megapixels per image (--max-image-mb, "
        "--max-image-pixels); downscale it",
        param,
        "image_too_large",
    )
