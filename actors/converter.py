"""The converter: ResolveMedia → yt-dlp (+ a probe of a direct link) → limits checked → MediaResolved.

The decisions live in ``actors.core.ytdlp_info`` (which format, what the source is, which error code) and
``actors.core.plan`` (the plan and the limits); this module does the I/O around them.

Every fetch goes through the SSRF guard; each job has guards of its own (one for yt-dlp, one for
ffprobe), holding the job's deadline and byte budgets. yt-dlp runs in warm worker processes
(``actors.guard.extract``), one job at a time each and one worker per message in flight, never on
this event loop or in its threads: a page that drips or weighs hundreds of MB costs its own job's
worker (killed at the deadline, then replaced), never another job's turn. Warm workers keep the
cost of a resolve of a direct link at that of yt-dlp itself (~0.02 s) plus the probe: a warm
PyAV worker's fresh child (``actors.adapters.prober``, ~10 ms plus the fetch) instead of an
ffprobe start (~0.1–0.3 s).
"""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from typing import Any

from actors.adapters.levers import Levers
from actors.adapters.prober import ProbePool
from actors.core.freshness import stamp_resolution
from actors.core.plan import Limits, plan_media
from actors.core.probe import ProbeResult
from actors.core.request import validate_request
from actors.core.source import SourceInput
from actors.core.ytdlp_info import probe_target, source_info, with_probe
from actors.guard import check_url
from actors.guard.extract import ExtractorPool, extracted_info, ytdlp_params  # noqa: F401 (re-exported)
from actors.guard.proxy import PAGE_BUDGET
from actors.guard.urls import refuse_unfetchable
from actors.runtime.worker import Actor, Context
from messages.errors import ErrorCode, JobError
from messages.types import ConvertRequested, MediaPlan, MediaResolved, ResolveMedia, Stage


class Converter(Actor):
    """ResolveMedia → MediaResolved: resolves the URL, learns the source, checks the limits, plans."""

    name = "converter"
    stage = Stage.PREPARING
    step = "resolve"

    async def setup(self) -> None:
        """Start the extraction workers and probers: up to one per message in flight, so no job waits
        for another's slow page (a quick one it waits for: see ``ExtractorPool``)."""
        self.levers = Levers.open(self.settings)
        size = self.settings.prefetch or self.prefetch
        self.probes = ProbePool(size)
        self.pool = ExtractorPool(
            size=size,
            make_guard=lambda: self.levers.guard(idle_timeout=self.settings.network_timeout, page_budget=PAGE_BUDGET),
            network_timeout=self.settings.network_timeout, max_bytes=self.settings.max_output_bytes,
            levers=self.levers.worker_levers(),
        )
        await self.probes.__aenter__()  # its worker starts in the background, beside yt-dlp's
        try:
            await self.pool.__aenter__()
        except BaseException:
            await self.probes.__aexit__(None, None, None)
            self.levers.close()
            raise

    async def teardown(self) -> None:
        """Stop the workers (a running extraction's worker is killed and reaped)."""
        try:
            await asyncio.gather(self.pool.__aexit__(None, None, None), self.probes.__aexit__(None, None, None))
        finally:
            self.levers.close()

    async def resolve(self, message: ResolveMedia, ctx: Context) -> None:
        """Resolve ``message.request.url`` and publish the plan (or raise a coded JobError)."""
        plan = await self.plan_for(message.request)
        await ctx.publish(MediaResolved(job_id=message.job_id, plan=plan))

    async def plan_for(self, request: ConvertRequested) -> MediaPlan:
        """The MediaPlan for ``request``: checks, yt-dlp, a probe where needed, limits."""
        error = validate_request(request, max_duration=self.settings.max_duration)
        if error is not None:
            raise JobError(error.code, error.detail)
        url = request.url.strip()
        check_url(url, allow=self.settings.allow_networks, deny=self.settings.deny_networks)
        info = await self._extract(url, deadline=asyncio.get_running_loop().time() + self.time_limit(request))
        refuse_unfetchable(info)
        source = source_info(info, request)
        target = probe_target(source)
        if target is not None:
            try:
                probe = await self._probe(target)
            except JobError as exc:
                if source.duration is None or exc.code is ErrorCode.URL_NOT_ALLOWED:
                    raise
                # yt-dlp knew the duration; the probe was only for codecs, and ffmpeg will judge the source
                self.log.info("probe failed; planning without codec details", extra={"code": str(exc.code)})
            else:
                source = with_probe(source, probe)
        plan = plan_media(request=request, source=source, limits=Limits.from_settings(self.settings))
        return stamp_resolution(plan, now=datetime.now(UTC))  # when its URLs were resolved, and expire

    # --- yt-dlp, in a worker process, through that worker's guard

    async def _extract(self, url: str, *, deadline: float) -> dict[str, Any]:
        """yt-dlp's processed info for ``url`` (plain data); raises coded JobErrors, TIMEOUT at ``deadline``."""
        return await extracted_info(self.pool, url, deadline=deadline)

    # --- the probe, through a guard of the job's own

    async def _probe(self, target: SourceInput) -> ProbeResult:
        """Probe ``target`` through the SSRF guard with the format's headers; raises coded JobErrors."""
        timeout = self.settings.network_timeout
        async with self.levers.guard(idle_timeout=timeout) as guard:
            try:
                result = await self.probes.probe(
                    guard.gateway_url(target.url), timeout=timeout, headers=target.headers,
                    wrap_input=guard.input_args, environment=guard.subprocess_env(os.environ),
                    memory_limit=self.settings.child_memory_limit)
            except JobError:
                guard.raise_if_blocked()  # a refused fetch explains the failure best
                raise
            guard.raise_if_blocked()  # ffmpeg skips HLS segments it cannot open and may still succeed
            return result
