"""Dependencies: the engine, queue and settings live on app.state (set by api.app.create_app).

They are `async def` on purpose: FastAPI runs sync dependencies in the thread pool, which costs a
thread hop per request on the hot worker endpoints for no benefit.
"""
from __future__ import annotations

from fastapi import Request
from sqlalchemy import Engine

from common.settings import Settings
from scheduler.queue import Queue
from scheduler.search import Searches


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_queue(request: Request) -> Queue:
    return request.app.state.queue


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_searches(request: Request) -> Searches:
    return request.app.state.searches
