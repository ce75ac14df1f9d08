"""``GET /v1/loras``: the adapters of ``--lora-dir`` (name, size, content hash, which served models
their keys fit, loaded or not). Listing may hash new files: it runs off the event loop."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from server.auth import require_owner
from server.openai_api.schemas import LoraList, LoraObject
from server.openai_api.serving import ERRORS

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/loras", response_model=LoraList, responses=ERRORS, summary="LoRA adapters (extension)")
async def list_loras(request: Request, owner: str | None = Depends(require_owner)) -> LoraList:
    state = request.app.state
    files = await asyncio.to_thread(state.loras.files)
    adapters = getattr(state.generator, "adapters", None)  # the model layer's; none on an API node
    loaded = adapters.loaded() if adapters is not None else set()
    profiles = state.catalog.profiles()
    data = [LoraObject(name=item.name, size=item.size, sha256=item.sha256,
                       models=[p.model_id for p in profiles if item.fits(p)],
                       loaded=any(name.endswith(item.sha256[:24]) for name in loaded))
            for item in files.values()]
    return LoraList(data=data)
