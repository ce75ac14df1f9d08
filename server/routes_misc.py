"""Routes that belong to neither protocol: health, API information, image files, the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import __version__
from server.core.errors import NotFound
from server.core.files import resolve_output
from server.openai_api.schemas import ErrorEnvelope

router = APIRouter()
WEB_CLIENT = Path(__file__).resolve().parent.parent / "web_client.html"
IMMUTABLE = "public, max-age=31536000, immutable"  # a file name is never reused for other bytes


@router.get("/health")
async def health(request: Request) -> dict:
    state = request.app.state
    catalog, engine = state.catalog, state.engine
    return {
        "status": "ok" if engine.accepting else "shutting_down",
        "model": catalog.default_model,
        "demo_model": any(p.is_demo for p in catalog.profiles()),
        "models": list(catalog.served),
        "generator": state.generator.describe(),
        "queue_depth": engine.counts().get("pending", 0),
        "jobs": engine.counts(),
        "version": __version__,
    }


@router.get("/api/health")
async def api_health() -> dict:
    return {"status": "ok"}


@router.get("/")
async def info(request: Request) -> dict:
    catalog = request.app.state.catalog
    return {
        "name": "t2i-server",
        "version": __version__,
        "models": [{"id": p.model_id, "description": p.description, "demo": p.is_demo,
                    "variants": list(p.variants)} for p in catalog.profiles()],
        "endpoints": {
            "generate": "POST /v1/images/generations",
            "models": "GET /v1/models",
            "jobs_websocket": "WS /api/ws?client_id=...",
            "image": "GET /api/image/{filename}",
            "health": "GET /health",
            "web_client": "GET /ui",
            "metrics": "GET /metrics",
            "docs": "GET /docs",
        },
    }


PNG = {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "The PNG file"}
NOT_FOUND = {404: {"model": ErrorEnvelope, "description": "No such image in the output directory"}}


@router.get("/api/image/{filename}", response_class=Response, responses={200: PNG, **NOT_FOUND})
async def image(filename: str, request: Request):
    path = resolve_output(request.app.state.settings.output_dir, filename)
    if path is None:
        raise NotFound("image not found", param="filename")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": IMMUTABLE})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/ui", response_class=HTMLResponse, responses=NOT_FOUND)
async def web_client():
    if not WEB_CLIENT.is_file():
        return JSONResponse({"error": {"message": "web_client.html is not installed", "type": "not_found"}}, 404)
    return FileResponse(WEB_CLIENT, media_type="text/html")


def install(app: FastAPI) -> None:
    app.include_router(router)
