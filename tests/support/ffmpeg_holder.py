"""Runs a long ffmpeg under FfmpegProcess and prints its pid; the test SIGKILLs this process."""

import asyncio

from actors.adapters.ffmpeg import FfmpegProcess


async def main() -> None:
    argv = ["ffmpeg", "-nostdin", "-f", "lavfi", "-i", "sine=duration=600", "-f", "wav", "pipe:1"]
    async with FfmpegProcess(argv) as ff:
        print(ff.pid, flush=True)
        await ff.wait()


asyncio.run(main())
