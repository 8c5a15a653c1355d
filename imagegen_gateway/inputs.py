"""The images uploaded to ``/v1/images/edits`` and ``/v1/images/variations``, checked as OpenAI documents.

dall-e-2 takes one square PNG under 4 MB (for an edit without a mask its transparent pixels are the mask);
GPT image models take up to 16 PNG, JPEG or WEBP images under 50 MB each. A mask is a PNG with an alpha
channel, under 4 MB, of the first image's dimensions.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from imagegen_gateway.rules import DALL_E_2, InvalidRequest, ModelRules, Operation

MB = 1024 * 1024
#: Whole multipart body; above this the upload is refused before it is read.
MAX_UPLOAD_BYTES = 64 * MB
_DALL_E_2_BYTES = 4 * MB
_GPT_BYTES = 50 * MB
_GPT_FORMATS = ("png", "jpeg", "webp")
#: Models outside OpenAI's table: any image Pillow reads, as many as GPT image models take.
_MAX_OTHER_IMAGES = 16


@dataclass(frozen=True)
class InputImage:
    """One uploaded image, decoded far enough to know its format, size and alpha channel."""

    data: bytes
    format: str
    width: int
    height: int
    has_alpha: bool


def read_image(data: bytes, param: str) -> InputImage:
    """Decode the header of an upload.

    :raises InvalidRequest: not an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"Invalid input image for '{param}': the file is not a supported image.", param,
                             "invalid_image_format") from None
    return InputImage(data, fmt, width, height, has_alpha)


def _check_dall_e_2(image: InputImage, *, operation: Operation, has_mask: bool) -> None:
    if image.format != "png":
        raise InvalidRequest(f"Invalid input image: dall-e-2 takes a PNG, got {image.format}.", "image",
                             "invalid_image_format")
    if len(image.data) >= _DALL_E_2_BYTES:
        raise InvalidRequest("Invalid input image: dall-e-2 images must be less than 4 MB.", "image",
                             "image_too_large")
    if image.width != image.height:
        raise InvalidRequest(f"Invalid input image: dall-e-2 images must be square, got {image.width}x{image.height}.",
                             "image", "invalid_image_dimensions")
    if operation is Operation.EDIT and not has_mask and not image.has_alpha:
        raise InvalidRequest("Invalid input image: without a mask the image must have transparent areas (an alpha "
                             "channel) that mark where to edit.", "image", "invalid_image_format")


def _check_gpt(image: InputImage) -> None:
    if image.format not in _GPT_FORMATS:
        raise InvalidRequest(f"Invalid input image: use png, jpeg or webp, got {image.format}.", "image",
                             "invalid_image_format")
    if len(image.data) >= _GPT_BYTES:
        raise InvalidRequest("Invalid input image: images must be less than 50 MB.", "image", "image_too_large")


def _check_mask(mask: InputImage, first: InputImage) -> None:
    if mask.format != "png" or not mask.has_alpha:
        raise InvalidRequest("Invalid mask: it must be a PNG with an alpha channel.", "mask", "invalid_image_format")
    if len(mask.data) >= _DALL_E_2_BYTES:
        raise InvalidRequest("Invalid mask: it must be less than 4 MB.", "mask", "image_too_large")
    if (mask.width, mask.height) != (first.width, first.height):
        raise InvalidRequest(
            f"Invalid mask: its size {mask.width}x{mask.height} differs from the image's {first.width}x{first.height}.",
            "mask", "invalid_image_dimensions",
        )


def check_inputs(
    rules: ModelRules | None, operation: Operation, images: Sequence[InputImage], mask: InputImage | None
) -> None:
    """Refuse uploads the model does not take.

    :raises InvalidRequest: the first problem found.
    """
    if not images:
        raise InvalidRequest("You must provide an image.", "image", "missing_required_parameter")
    if mask is not None and operation is Operation.VARIATION:
        raise InvalidRequest("Unknown parameter: 'mask' is not supported by image variations.", "mask",
                             "unknown_parameter")
    limit = _MAX_OTHER_IMAGES if rules is None else max(rules.max_edit_images, int(rules.variations))
    if operation is Operation.VARIATION:
        limit = 1
    if len(images) > limit:
        raise InvalidRequest(f"Too many images: at most {limit} for this model and operation.", "image",
                             "too_many_images")
    for image in images:
        if rules is DALL_E_2:
            _check_dall_e_2(image, operation=operation, has_mask=mask is not None)
        elif rules is not None:
            _check_gpt(image)
    if mask is not None:
        _check_mask(mask, images[0])


def digest(images: Sequence[InputImage], mask: InputImage | None) -> str:
    """Fingerprint of the uploads: the picture of an edit depends on what was edited."""
    sha = hashlib.sha256()
    for image in (*images, *([mask] if mask is not None else [])):
        sha.update(hashlib.sha256(image.data).digest())
    return sha.hexdigest()[:16]
