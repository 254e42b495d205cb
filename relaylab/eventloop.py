"""Run a service's main coroutine on the fastest available event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    # uvloop (libuv) costs a fraction of the stock loop per connection and per read; the
    # milter and policyd spend most of their non-crypto CPU there. Optional: without it
    # the stock loop runs the same code.
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
