"""GetGoodTape's actors, the code they stand on, and the ``getgoodtape`` command. This docstring is the map.

The four actors (their names and queues are on the wire: ``ggt.<name>``), each a thin set of handlers:

- ``coordinator.py`` — accepts a ConvertRequested, owns the job record (in the bucket), presigns the
  upload, completes it, presigns the download and announces JobProgress / JobCompleted / JobFailed;
- ``converter.py``   — *resolves and plans*: yt-dlp (and a probe of a direct link) turns the URL into
  a typed MediaPlan; it runs no conversion;
- ``uploader.py``    — *converts and uploads*: runs the plan's ffmpeg and streams its stdout straight
  into the presigned PUTs (the "converting" stage happens here), holding no credentials;
- ``verifier.py``    — HEAD and a probe of the stored object against what was streamed.

The folders, by kind:

- ``core/``      pure decisions, values in and values out (catalog of formats, request gate, plan,
  ffmpeg argv, stages and progress, job record rules, upload arithmetic, verdicts);
- ``adapters/``  the outside world's tools wrapped: ffmpeg and ffprobe processes, the prober (warm
  PyAV workers, a fork per probe), the presigned upload, the programs found on PATH, the levers;
- ``guard/``     the SSRF guard and hostile sources: pure address/URL rules, the enforcing proxy,
  the killable extraction worker, the feeder;
- ``runtime/``   what every actor process shares: the Worker loop, the pure settle decision,
  settings, logs, metrics, the local HTTP helper, the storage config;
- ``bootstrap/`` the composition root: which actors exist, which bus and storage a process gets,
  running them until SIGTERM;
- ``cli/``, ``gateway/`` the edges: the ``getgoodtape`` command and the HTTP API.

Imports run downwards only (tests/house/test_layers.py checks it): ``core`` → messages (and the pure
guard rules, the settings struct); ``runtime`` → core, bus, storage; ``adapters``/``guard`` → core,
runtime; the actors → all of those, never each other; ``bootstrap`` → the actors; only the edges
import ``bootstrap``, and only an edge imports an edge. docs/ARCHITECTURE.md traces one job through it.
"""

#: the release (pyproject.toml reads it from here)
__version__ = "0.1.0"
