"""The OpenAI adapter's delivery logic shared by its routes (generations, stream resume): usage
accounting, the images of a finished job, and the one mapping from a job's failure code to the
domain error the envelope mapping (``server.openai_api.errors``) renders.
"""

from __future__ import annotations

import asyncio

from server.config import Settings
from server.core import files
from server.core.errors import AdapterRejected, GenerationFailed, NotFound, OutOfMemory, ServerError, ShuttingDown
from server.core.jobs import JobRecord
from server.core.spec import JobSpec
from server.core.states import FailureCode, JobStatus
from server.openai_api.b64body import Slots, Source
from server.openai_api.schemas import ErrorEnvelope, InputTokensDetails, Usage
from server.openai_api.variants import VariantCache
from server.streaming import FinalImage

ERRORS = {status: {"model": ErrorEnvelope} for status in (400, 401, 404, 429, 500, 503)}

# Failure code -> the error a client sees (status and envelope via server.openai_api.errors).
# Codes not listed are a generation failure: 500 with x-should-retry: false.
FAILURE_ERRORS: dict[FailureCode, type[ServerError]] = {
    FailureCode.SHUTDOWN: ShuttingDown,
    FailureCode.OUT_OF_MEMORY: OutOfMemory,
    FailureCode.INVALID_ADAPTER: AdapterRejected,  # 400, param loras
}


def usage_for(spec: JobSpec) -> Usage:
    """Rough, stable accounting: prompt words in, one token per 16x16 patch of every image out;
    an edit's input image counts as input, one token per 16x16 patch at the job's size."""
    text = len(spec.prompt.split())
    patches = (spec.width // 16) * (spec.height // 16)
    given = patches if spec.image_sha is not None else 0
    image = patches * spec.n
    return Usage(input_tokens=text + given, output_tokens=image, total_tokens=text + given + image,
                 input_tokens_details=InputTokensDetails(text_tokens=text, image_tokens=given))


def job_failure(record: JobRecord) -> ServerError:
    """The domain error for a job that ended without images, chosen by its failure code (the
    message is only shown)."""
    reason = record.error or "generation failed"
    if record.status is JobStatus.CANCELLED:
        return GenerationFailed(f"The job was cancelled: {reason}", code=FailureCode.CANCELLED.value)
    # Other codes keep the envelope's generic ``generation_failed`` (the wire stays as it was).
    return FAILURE_ERRORS.get(record.failure, GenerationFailed)(reason)


async def final_images(settings: Settings, record: JobRecord, fmt: str, compression: int,
                       variants: VariantCache | None = None) -> tuple[list[FinalImage], Slots]:
    """The job's images (and upscaled images) in ``fmt``, each base64 field a placeholder token of
    the returned ``Slots`` (``b64body``): the answer is rendered with the tokens and its base64 made
    while it is sent. PNG streams from the stored file; re-encoded variants come from ``variants``
    when cached, a miss waits for an encode slot. Raises ``NotFound`` before anything is sent when
    a file is gone. File work runs off the loop."""
    slots = Slots()

    def load() -> list[FinalImage]:
        out = []
        for index, (img, seed) in enumerate(zip(record.result.images, record.result.seeds)):
            upscaled = (slots.add(_source(settings, img.upscaled_filename, fmt, compression, variants))
                        if img.upscaled_filename else None)
            out.append(FinalImage(index, slots.add(_source(settings, img.filename, fmt, compression, variants)),
                                  seed, upscaled))
        return out

    names = [name for img in record.result.images for name in (img.filename, img.upscaled_filename) if name]
    if fmt == "png" or variants is None or variants.has_all([(name, fmt, compression) for name in names]):
        return await asyncio.to_thread(load), slots
    async with variants.slots:
        return await asyncio.to_thread(load), slots


def _source(settings: Settings, filename: str, fmt: str, compression: int,
            variants: VariantCache | None = None) -> Source:
    path = files.resolve_output(settings.output_dir, filename)
    if path is None:
        raise NotFound("The job's image file is no longer available; generate it again with another seed.")
    if fmt == "png":
        return Source.of_file(path)
    if variants is None:
        return Source.of_bytes(files.read_as(path, fmt, compression))
    key = (filename, fmt, compression)
    data = variants.get(key)
    if data is None:
        data = files.read_as(path, fmt, compression)
        variants.put(key, data)
    return Source.of_bytes(data)
