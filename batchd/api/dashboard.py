"""The dashboard: one static page, and the routes it reads the spool through."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from ..config import Settings
from ..layout import BENCH
from ..spool.daemons import Registry
from ..spool.listing import bench_groups, job_rows, waiting_file
from ..spool.outbox import read_status
from .auth import authorized

router = APIRouter()
data = APIRouter(dependencies=[Depends(authorized)])  # everything but the page itself

PAGE = resources.files("batchd.api").joinpath("dashboard.html").read_text(encoding="utf-8")
# The dashboard's icon: a "b" on batchd's header colour.
ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
        b'<rect width="16" height="16" rx="3" fill="#1d2330"/>'
        b'<text x="8" y="12.5" font-family="sans-serif" font-size="12" font-weight="bold" '
        b'fill="#fff" text-anchor="middle">b</text></svg>')




def settings_of(request: Request) -> Settings:
    return request.app.state.store.settings


@router.get("/", response_class=HTMLResponse)
def dashboard() -> str:
    return PAGE  # no data in it: the page asks the routes below, with the key


@router.get("/favicon.ico")
def favicon() -> Response:
    # browsers ask for it whatever the page says: an icon, not a 404 in the log
    return Response(ICON, media_type="image/svg+xml",
                    headers={"Cache-Control": "max-age=86400"})


@data.get("/dashboard/jobs")
def dashboard_jobs(request: Request) -> list[dict[str, Any]]:
    return job_rows(settings_of(request))


@data.get("/dashboard/jobs/{job}")
def dashboard_job(job: str, request: Request) -> dict[str, Any]:
    settings = settings_of(request)
    batch = request.app.state.store.batch(job)  # checks the name
    bench = settings.layout.out(job, BENCH)
    try:
        record = json.loads(bench.read_text())
    except (OSError, ValueError):
        record = None
    history = read_status(settings.layout.status(job))
    # Still in the inbox: its waiting line (state waiting, phase settling or in_inbox)
    waiting = None if history else waiting_file(settings, job)
    return {"batch": batch, "history": history, "bench": record,
            "waiting": waiting.record() if waiting else None}


@data.get("/dashboard/replicas")
def dashboard_replicas(request: Request) -> list[dict[str, Any]]:
    """Each live daemon's engine replicas (none with one engine each)."""
    settings = settings_of(request)
    registry = Registry(settings.layout, settings.scheduling.lease_seconds)
    return [{"daemon": record.get("daemon"), **line} for record in registry.all()
            if record.get("live") for line in record.get("replicas") or []]


@data.get("/dashboard/bench")
def dashboard_bench(request: Request) -> dict[str, Any]:
    return bench_groups(settings_of(request).outbox)
