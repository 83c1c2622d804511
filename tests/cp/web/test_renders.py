"""SharedRenders (issue 13): browsers showing the same live fragment share one render per change burst, and a
render is never reused for a change that came after it started."""

from __future__ import annotations

import asyncio

from nkudo.cp.web.renders import SharedRenders


def test_concurrent_askers_share_one_render_and_later_changes_get_a_new_one() -> None:
    async def go() -> None:
        shared, calls = SharedRenders(), []

        async def make() -> str:
            calls.append(1)
            await asyncio.sleep(0.05)
            return f"html-{len(calls)}"

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # 50 open pages answering the same change: one render.
        out = await asyncio.gather(*(shared.get(("overview", "t1"), t0, make) for _ in range(50)))
        assert set(out) == {"html-1"} and len(calls) == 1
        # A change that arrived after that render started: a new render (never an older state).
        await asyncio.sleep(0.01)
        assert await shared.get(("overview", "t1"), loop.time(), make) == "html-2" and len(calls) == 2
        # Another key (another tenant, or a viewer who may see less): its own render.
        assert await shared.get(("overview", "t2"), t0, make) == "html-3" and shared.renders == 3

    asyncio.run(go())


def test_a_failed_render_is_not_reused() -> None:
    async def go() -> None:
        shared = SharedRenders()

        async def boom() -> str:
            raise RuntimeError("database gone")

        async def fine() -> str:
            return "ok"

        t0 = asyncio.get_running_loop().time()
        try:
            await shared.get("k", t0, boom)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the failure must reach the asker")
        assert await shared.get("k", t0, fine) == "ok"

    asyncio.run(go())
