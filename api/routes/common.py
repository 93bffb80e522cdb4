"""Helpers shared by the routers."""
from __future__ import annotations

import re

from api.models import INT32_MAX
from api.responses import FastRoute
from fastapi import APIRouter
from scheduler.grids import NotFound
from scheduler.spec import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)


def router(tag: str) -> APIRouter:
    return APIRouter(route_class=FastRoute, tags=[tag])


def grid_ref(value: str) -> int | str:
    """A grid path segment as the scheduler wants it: an id (digits) or a name. Anything that cannot
    name a grid (too big for an id, characters a name may not have) is simply not found."""
    if value.isascii() and value.isdigit():
        if len(value) > 10 or int(value) > INT32_MAX:
            raise NotFound(f"no grid numbered {value[:20]}")
        return int(value)
    if not _NAME.match(value):
        raise NotFound(f"no grid named {value[:100]!r} (names are letters, digits, '.', '_' or '-')")
    return value
