"""yt-dlp extraction where it can be stopped: warm worker processes, one job at a time each.

A page is hostile: it may drip a byte a second or weigh hundreds of MB and be run through hundreds
of regular expressions. So the converter never extracts on its own event loop or in one of its
threads: ``ExtractorPool`` keeps warm workers (yt-dlp imported, extractor patterns compiled), hands
each job to an idle one over a socket (one JSON line each way) and, when a job's deadline passes or
it is cancelled, kills that worker's process group and starts a fresh one. One bad page costs one
worker, never another job's turn; a stopped job leaves no thread and no process. Each worker
fetches through a guard of its own, whose record, deadline and budgets are those of the one job it runs.

Workers are forked from a zygote: ``python -m actors.guard.extract --zygote`` imports yt-dlp and
compiles its ~1,900 URL patterns once (~0.9 s of CPU), then only forks — a worker costs a fork and
a YoutubeDL (~40 ms) instead of that start, whether the pool grows for a burst or replaces a worker
a hostile page took. The zygote never sees a URL: each worker is a fresh copy of a process that has
run no job. Each worker sends its own pidfd as its first message, so the pool signals and awaits
exactly that process (the zygote is its parent, and the kernel reaps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from actors.adapters.ffmpeg import die_with_parent
from actors.adapters.tools import ytdlp_js_runtimes
from actors.guard.children import child_env
from messages.errors import ErrorCode, JobError

if TYPE_CHECKING:  # only the pool's side uses a guard; the zygote and its workers never load aiohttp
    from actors.guard.proxy import FetchGuard

log = logging.getLogger(__name__)

#: key of yt-dlp's fallback extractor that reads any web page (its "Unsupported URL" means "no media here")
GENERIC_EXTRACTOR = "Generic"
#: a URL no site extractor claims, for the warm-up (it is matched against patterns, never fetched)
WARM_UP_URL = "https://warm-up.invalid/"
#: an HTTP date, parsed once at warm-up
WARM_UP_DATE = "Tue, 02 Jan 2024 03:04:05 GMT"
#: yt-dlp's own pick is not used (``actors.core.ytdlp_info`` chooses), so a spec that never needs merging:
#: the default one would run ``ffmpeg -version`` (~0.2 s) to see whether merging is possible
FORMAT_SPEC = "best/bestvideo/bestaudio"
#: only the first entry of a playlist is ever extracted (the rest would cost a request each)
PLAYLIST_ITEMS = "1"
#: the line a worker writes once it is warm
READY = b'{"ready":true}\n'
#: largest answer line read from a worker (an info dict with many formats runs to a few MB)
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: seconds a new worker has to import yt-dlp and warm up before it counts as failed
START_TIMEOUT = 60.0
#: seconds a job waits for a busy worker before the pool starts one more (a fork of the zygote, ~40 ms)
GROW_AFTER_S = 0.25
#: the zygote's first argument
ZYGOTE_FLAG = "--zygote"
#: largest control message (a spawn request: the guard's proxy URL; the levers, once)
MAX_CONTROL_BYTES = 1024 * 1024
#: bytes of a worker's first message: its pid, zero-padded (its pidfd rides along)
PID_RECORD = 10
#: seconds the zygote has to exit once its socket is closed before its group is killed
ZYGOTE_EXIT_S = 5.0
#: seconds a fork request may take to be read and answered with the worker's record (milliseconds
#: normally): past it the zygote counts as stuck and is replaced
FORK_TIMEOUT = 10.0


class _YtdlpLog:
    """yt-dlp's logger interface, forwarded to ours (its errors are raised and reported, so they log at info)."""

    def __init__(self, target: logging.Logger) -> None:
        self._log = target

    def debug(self, message: str) -> None:
        self._log.debug("yt-dlp: %s", message)

    def info(self, message: str) -> None:
        self._log.debug("yt-dlp: %s", message)

    def warning(self, message: str) -> None:
        self._log.info("yt-dlp warning: %s", message)

    def error(self, message: str) -> None:
        self._log.info("yt-dlp error: %s", message)


def ytdlp_params(*, proxy: Mapping[str, object], network_timeout: float, max_bytes: int,
                 logger: object) -> dict[str, Any]:
    """YoutubeDL params for resolving untrusted URLs: no config, cache, netrc, downloads or post-processing.

    ``proxy`` is the guard's ``ytdlp_options()``. Config files are a CLI feature (the API reads none);
    plugins are limited separately (``ytdlp_levers.use_plugin_dir``). ``cookiefile`` stays None even
    with the operator's cookies: yt-dlp saves its cookiefile on close, so they are put into its jar
    instead (``actors.guard.cookies``).
    """
    return {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": logger,
        "skip_download": True,
        "format": FORMAT_SPEC,
        "noplaylist": True,  # a watch-URL inside a playlist means the video
        "playlist_items": PLAYLIST_ITEMS,
        "extract_flat": False,
        "lazy_playlist": False,
        "socket_timeout": network_timeout,
        # applies to downloads only (we download nothing here); set so no code path ever exceeds it
        "max_filesize": max_bytes,
        "usenetrc": False,
        "netrc_cmd": None,
        "cachedir": False,
        "cookiefile": None,
        "cookiesfrombrowser": None,
        "postprocessors": [],
        "external_downloader": {},
        "source_address": None,
        "enable_file_urls": False,
        "allow_unplayable_formats": False,
        "check_formats": False,
        **proxy,
    }


#: environment variable holding the feeder's WorkerLevers (JSON): not argv, which ``ps`` shows everyone
FEEDER_LEVERS_VARIABLE = "GGT_FEEDER_LEVERS"


class WorkerLevers(msgspec.Struct, frozen=True, kw_only=True):
    """The operator's levers for a worker, sent as its first stdin line (never in argv, which ``ps`` shows)."""

    #: the operator's cookies file ("" = none); read-only, loaded into the worker's jar
    cookies_file: str = ""
    #: YoutubeDL ``extractor_args`` (``ytdlp_levers.parse_extractor_args``)
    extractor_args: dict[str, dict[str, list[str]]] = {}
    #: the plugin directory of the allowed plugin packages ("" = no plugins; ``ytdlp_levers.plugin_view``)
    plugin_dir: str = ""


class SpawnRequest(msgspec.Struct, frozen=True):
    """The pool's request to the zygote: fork a worker fetching through ``proxy`` (the guard's URL)."""

    proxy: str


class ExtractRequest(msgspec.Struct, frozen=True):
    """One job for a worker: the URL."""

    url: str


class ExtractError(msgspec.Struct, frozen=True):
    """A coded failure, as ``messages.errors.JobError`` carries it."""

    code: str
    detail: str
    retryable: bool


class ExtractAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    """A worker's answer: yt-dlp's sanitised info dict, or the coded error."""

    info: dict[str, Any] | None = None
    error: ExtractError | None = None


# --- the worker process


class _Warm:
    """What every worker shares, made once in the zygote before any fork: yt-dlp imported, the
    operator's plugins and cookies loaded, every extractor's URL pattern compiled. Never a fetch."""

    def __init__(self, *, network_timeout: float, max_bytes: int, levers: WorkerLevers | None = None) -> None:
        import yt_dlp
        from yt_dlp.extractor import gen_extractor_classes
        from yt_dlp.utils import unified_timestamp

        from actors.guard.cookies import cookie_names, load_cookies
        from actors.guard.ytdlp_levers import use_plugin_dir

        self.network_timeout, self.max_bytes = network_timeout, max_bytes
        self.levers = levers or WorkerLevers()
        use_plugin_dir(self.levers.plugin_dir)  # only the operator's allowed plugin packages, or none
        self.cookies = load_cookies(self.levers.cookies_file) if self.levers.cookies_file else None
        self.cookie_names = cookie_names(self.cookies) if self.cookies is not None else frozenset()
        # Deno from PyPI sits beside this interpreter, maybe off PATH: name it (YouTube's challenges)
        self.js_runtimes = ytdlp_js_runtimes() or {"deno": {}}
        # yt-dlp's own order (YoutubeDL tries them in it): the first suitable extractor handles a URL
        self.extractors = gen_extractor_classes()
        # pay yt-dlp's one-off costs now rather than in each worker (no network involved): every
        # extractor's URL pattern (~1,900 regexes), the generic extractor's module, the first date
        # parse, and a YoutubeDL's first making (a proxy nothing is sent to; it is dropped unused)
        self.extractor_for(WARM_UP_URL)
        yt_dlp.YoutubeDL(self.params("http://127.0.0.1:9")).get_info_extractor(GENERIC_EXTRACTOR)
        unified_timestamp(WARM_UP_DATE)

    def params(self, proxy: str) -> dict[str, Any]:
        """YoutubeDL params for a worker fetching through ``proxy``."""
        params = ytdlp_params(proxy={"proxy": proxy, "geo_verification_proxy": proxy},
                              network_timeout=self.network_timeout, max_bytes=self.max_bytes, logger=_YtdlpLog(log))
        params["extractor_args"] = self.levers.extractor_args
        params["js_runtimes"] = self.js_runtimes
        return params

    def extractor_for(self, url: str) -> str:
        """The key of the extractor yt-dlp picks for ``url`` (the generic one is last)."""
        return next((ie.ie_key() for ie in self.extractors if ie.suitable(url)), "")


class _Worker:
    """What runs in a forked worker: one YoutubeDL through the worker's guard, one request at a time."""

    def __init__(self, warm: _Warm, *, proxy: str) -> None:
        import yt_dlp

        self._warm = warm
        # one YoutubeDL for the worker's life, always through its guard
        self.ydl = yt_dlp.YoutubeDL(warm.params(proxy))
        self.ydl.get_info_extractor(GENERIC_EXTRACTOR)

    def extractor_for(self, url: str) -> str:
        """The key of the extractor yt-dlp picks for ``url`` (the generic one is last)."""
        return self._warm.extractor_for(url)

    def extract(self, request: ExtractRequest) -> ExtractAnswer:
        """yt-dlp's processed info for the request's URL, or its coded error."""
        from yt_dlp.utils import YoutubeDLError

        from actors.core.ytdlp_info import ytdlp_error
        from actors.guard.cookies import apply_to, strip_from_info

        ydl, warm = self.ydl, self._warm
        ydl.cookiejar.clear()  # a site's cookies from another job stay with that job
        if warm.cookies is not None:
            apply_to(ydl.cookiejar, warm.cookies)
        try:
            info = ydl.extract_info(request.url, download=False, process=True)
        except YoutubeDLError as exc:  # DownloadError wraps most; RequestError (file:// …) comes bare
            text = str(exc)
            by_generic = "unsupported url" in text.lower() and self.extractor_for(request.url) == GENERIC_EXTRACTOR
            error = ytdlp_error(text, by_generic=by_generic)
            return ExtractAnswer(error=ExtractError(error.code.value, error.detail, error.retryable))
        if not isinstance(info, dict):
            return ExtractAnswer(error=ExtractError("no_media_found", "yt-dlp returned nothing", False))
        # plain data from here on: no LazyLists or callables cross into the planning core; the
        # operator's cookies stay in this process (the guards add them again where they match)
        return ExtractAnswer(info=strip_from_info(ydl.sanitize_info(info), warm.cookie_names))


def zygote_main(argv: list[str]) -> None:
    """``python -m actors.guard.extract --zygote TIMEOUT MAX_BYTES``: warm up, then fork a worker per request.

    Its stdin is a SOCK_SEQPACKET socket to the pool: first the WorkerLevers (never argv, which
    ``ps`` shows everyone), answered by READY once warm; then one ``SpawnRequest`` per message, with
    the worker's end of a socket pair as its one descriptor. It ends when the pool closes the socket.
    """
    timeout, max_bytes = argv
    control = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # a library reading stdin reads nothing, not the control socket
    os.close(null)
    # the protocol owns its sockets; anything a library prints goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    levers = msgspec.json.decode(control.recv(MAX_CONTROL_BYTES), type=WorkerLevers)
    warm = _Warm(network_timeout=float(timeout), max_bytes=int(max_bytes), levers=levers)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers; the pool watches their pidfds
    # what the warm-up made stays out of the collector's reach, so a worker's collections do not
    # write to (and copy) the pages it shares with the zygote
    gc.collect()
    gc.freeze()
    decoder = msgspec.json.Decoder(SpawnRequest)
    zygote = os.getpid()
    control.sendall(READY)
    while True:
        message, fds, _flags, _address = socket.recv_fds(control, MAX_CONTROL_BYTES, 1)
        if not message:
            return  # the pool has gone
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        try:
            request = decoder.decode(message)
        except msgspec.DecodeError:
            os.close(fds[0])
            continue
        try:
            child = os.fork()
        except OSError:  # EAGAIN/ENOMEM (a pids limit under load): the pool sees the socket close
            os.close(fds[0])  # and fails this one start; the zygote and its workers go on
            continue
        if child == 0:
            try:
                control.close()
                _worker_child(warm, request, fds[0], zygote=zygote)
            finally:
                os._exit(1)
        os.close(fds[0])


def _children_die_with_worker() -> None:
    """Every process the worker starts (yt-dlp's Deno, an ``ffmpeg -version``) gets a parent-death
    signal: the kernel kills it when the worker dies, whoever killed the worker (the pool kills the
    group too; this covers a worker that died on its own, or with its zygote and converter). The worker
    is single-threaded, so a ``preexec_fn`` is safe, and its parent is the thread that stays."""
    popen_init = subprocess.Popen.__init__

    def init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        chosen = kwargs.get("preexec_fn")
        if chosen is None:
            kwargs["preexec_fn"] = die_with_parent
        else:
            def both() -> None:
                die_with_parent()
                chosen()
            kwargs["preexec_fn"] = both
        popen_init(self, *args, **kwargs)

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


def _worker_child(warm: _Warm, request: SpawnRequest, fd: int, *, zygote: int) -> None:
    """In a fresh fork of the zygote: a group of its own, gone with the zygote, its pidfd to the pool,
    then one JSON line in, one JSON line out on the socket until the pool closes it."""
    os.setsid()  # the pool kills the group: yt-dlp's Deno children too
    die_with_parent()
    if os.getppid() != zygote:  # the zygote died before the line above
        os._exit(1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # yt-dlp waits for its own children
    _children_die_with_worker()
    conversation = socket.socket(fileno=fd)
    pidfd = os.pidfd_open(os.getpid())
    socket.send_fds(conversation, [b"%0*d" % (PID_RECORD, os.getpid())], [pidfd])
    os.close(pidfd)
    worker = _Worker(warm, proxy=request.proxy)
    lines = conversation.makefile("rb")
    decoder = msgspec.json.Decoder(ExtractRequest)
    encoder = msgspec.json.Encoder(enc_hook=str)
    conversation.sendall(READY)
    for line in lines:
        try:
            answer = worker.extract(decoder.decode(line))
        except Exception as exc:  # a yt-dlp bug must not take the worker down with a traceback only
            answer = ExtractAnswer(error=ExtractError("media_unavailable", f"yt-dlp failed: {exc!r}", True))
        conversation.sendall(encoder.encode(answer) + b"\n")
    os._exit(0)


# --- the pool, in the converter


async def _readable(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (a socket with data or closed, a pidfd whose process ended), or
    with ``write`` writable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(fd)


class _Process:
    """One running worker: its socket, its pidfd, and the guard it fetches through (its record is the
    current job's)."""

    def __init__(self, pid: int, pidfd: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 guard: FetchGuard) -> None:
        self.pid, self.pidfd = pid, pidfd
        self.reader, self.writer = reader, writer
        self.guard = guard
        self._ended = select.poll()  # poll, not select: a pidfd may be numbered past FD_SETSIZE
        self._ended.register(pidfd, select.POLLIN)
        self._killed: asyncio.Future[None] | None = None

    @property
    def ended(self) -> bool:
        """Whether the worker has exited (its pidfd is readable)."""
        return self._killed is not None or bool(self._ended.poll(0))

    async def ask(self, request: ExtractRequest) -> ExtractAnswer:
        self.writer.write(msgspec.json.encode(request) + b"\n")
        await self.writer.drain()
        try:
            line = await self.reader.readline()
        except ValueError:  # the line passed MAX_ANSWER_BYTES: a page's formats, not a fault to retry
            raise JobError(ErrorCode.TOO_LARGE, f"yt-dlp's answer passed {MAX_ANSWER_BYTES} bytes",
                           retryable=False) from None
        if not line.endswith(b"\n"):
            raise ConnectionError("extraction worker ended")
        return msgspec.json.decode(line, type=ExtractAnswer)

    async def kill(self) -> None:
        """SIGKILL the worker's group (yt-dlp's Deno children too), wait for its end, stop its guard.
        A second call waits for the first."""
        if self._killed is not None:
            await asyncio.shield(self._killed)
            return
        self._killed = asyncio.get_running_loop().create_future()
        try:
            # the group's id stays reserved while any member lives, so this reaches the worker's own
            # leftovers even once it has exited (an OOM kill), and nothing else
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            waiter = asyncio.ensure_future(_readable(self.pidfd))
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                await asyncio.wait([waiter])  # SIGKILL was sent: the wait is short
                raise
        finally:
            self.writer.close()
            os.close(self.pidfd)
            try:
                await self.guard.__aexit__(None, None, None)
            finally:
                self._killed.set_result(None)


class ZygoteGone(Exception):
    """The zygote did not take or answer a fork request (it died, or stopped answering)."""


class _Zygote:
    """The warm process the pool forks its workers from (``zygote_main``), and its control socket."""

    def __init__(self, proc: asyncio.subprocess.Process, control: socket.socket) -> None:
        self.proc, self.control = proc, control
        #: it stopped answering (a fork's record did not come) or its socket broke: replace it
        self.broken = False

    @classmethod
    async def start(cls, *, environ: Mapping[str, str], network_timeout: float, max_bytes: int,
                    levers: bytes) -> _Zygote:
        """Start it and wait until it is warm; raises RuntimeError when it does not get there."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "actors.guard.extract", ZYGOTE_FLAG, str(network_timeout), str(max_bytes),
                stdin=theirs.fileno(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=child_env(environ), start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = cls(proc, ours)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(ours, levers)
            async with asyncio.timeout(START_TIMEOUT):
                line = await loop.sock_recv(ours, len(READY))
            if line != READY:
                raise RuntimeError(f"extraction zygote did not start (exit status {proc.returncode})")
        except BaseException:
            await zygote.close()
            raise
        return zygote

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.broken

    async def fork(self, proxy: str) -> tuple[int, int, socket.socket]:
        """A new worker fetching through ``proxy``: its pid, its pidfd and the pool's end of its socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            request = msgspec.json.encode(SpawnRequest(proxy=proxy))
            while True:
                try:
                    socket.send_fds(self.control, [request], [theirs.fileno()])
                    break
                except BlockingIOError:  # the zygote is behind: wait until it reads again
                    async with asyncio.timeout(FORK_TIMEOUT):
                        await _readable(self.control.fileno(), write=True)
        except (OSError, TimeoutError):  # gone (EPIPE, ECONNRESET) or stuck: the caller starts another
            self.broken = True
            ours.close()
            raise ZygoteGone from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            ours.setblocking(False)
            try:
                async with asyncio.timeout(FORK_TIMEOUT):  # a fork answers in milliseconds
                    await _readable(ours.fileno())
            except TimeoutError:
                self.broken = True  # stopped (SIGSTOP) or stuck in fork: replaced on the next need
                raise ZygoteGone from None
            # the worker's first message: its pid, fixed width, with its pidfd
            message, fds, _flags, _address = socket.recv_fds(ours, PID_RECORD, 1)
            for fd in fds:
                os.set_inheritable(fd, False)  # recvmsg gives no O_CLOEXEC: no child of ours may hold it
            if len(fds) != 1 or len(message) != PID_RECORD:
                for fd in fds:
                    os.close(fd)
                raise RuntimeError("extraction worker did not start (its fork failed or it died at once)")
        except BaseException:
            ours.close()
            raise
        return int(message), fds[0], ours

    async def close(self) -> None:
        """Close its socket (it exits at once), SIGKILL its group if it lingers or is stuck, reap it."""
        self.control.close()
        if self.broken:  # a stopped process does not read its socket's end
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        waiter = asyncio.ensure_future(self.proc.wait())
        try:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), ZYGOTE_EXIT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.shield(waiter)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.wait([waiter])
            raise


class ExtractorPool:
    """Up to ``size`` extraction workers, ``warm`` of them started up front; ``await pool.extract(…)`` runs one job.

    ``async with ExtractorPool(size=4) as pool:``. A job takes an idle worker; when none comes free
    within GROW_AFTER_S and fewer than ``size`` run, one more is started (~1 s and ~0.9 s of CPU, once)
    and the job takes whichever worker is idle first — so a burst of quick extractions (a direct link
    takes ~40 ms) queues for the warm workers instead of paying a start each, while slow pages still
    spread over ``size`` workers. A job that fails its deadline or is cancelled
    takes its worker with it (killed and reaped), and a new one is started in the pool's own task
    group while fewer than ``warm`` are left.
    """

    def __init__(self, *, size: int, make_guard: Callable[[], FetchGuard], network_timeout: float,
                 max_bytes: int, warm: int = 1, environ: Mapping[str, str] | None = None,
                 levers: WorkerLevers | None = None) -> None:
        self._size = max(1, size)
        self._make_guard = make_guard
        self._network_timeout = network_timeout
        self._max_bytes = max_bytes
        self._warm = min(max(1, warm), self._size)
        self._environ = os.environ if environ is None else environ
        self._levers = msgspec.json.encode(levers or WorkerLevers()) + b"\n"
        self._idle: asyncio.Queue[_Process] = asyncio.Queue()
        self._all: set[_Process] = set()
        self._group = asyncio.TaskGroup()
        self._replacing: set[asyncio.Task[None]] = set()
        #: workers being started for the jobs waiting (counted against ``size`` before they exist)
        self._growing = 0
        self._zygote: _Zygote | None = None
        self._zygote_lock = asyncio.Lock()
        self._closing = False

    async def __aenter__(self) -> ExtractorPool:
        await self._group.__aenter__()
        try:
            await self._zygote_up()
            workers = await asyncio.gather(*(self._start() for _ in range(self._warm)))
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        for worker in workers:
            self._idle.put_nowait(worker)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._closing = True  # a job still running when its worker is killed starts no other
        for task in list(self._replacing):
            task.cancel()
        try:
            await self._group.__aexit__(*exc_info)
        finally:
            try:
                for worker in list(self._all):
                    await worker.kill()
                self._all.clear()
            finally:
                zygote, self._zygote = self._zygote, None
                if zygote is not None:
                    await zygote.close()

    @property
    def pids(self) -> list[int]:
        """The process ids of the pool's workers (running or starting)."""
        return [worker.pid for worker in self._all]

    @property
    def zygote_pid(self) -> int | None:
        """The process id of the zygote the workers are forked from (None before it started)."""
        return self._zygote.proc.pid if self._zygote is not None else None

    async def _zygote_up(self) -> _Zygote:
        """The running zygote, started again if it has died (the OOM killer, an operator's signal)."""
        async with self._zygote_lock:
            if self._zygote is not None and not self._zygote.alive:
                log.warning("the extraction zygote is gone or stuck (exit status %s); starting another",
                            self._zygote.proc.returncode)
                dead, self._zygote = self._zygote, None
                await dead.close()
            if self._zygote is None:
                self._zygote = await _Zygote.start(environ=self._environ, network_timeout=self._network_timeout,
                                                   max_bytes=self._max_bytes, levers=self._levers)
            return self._zygote

    async def extract(self, url: str, *, deadline: float) -> ExtractAnswer:
        """yt-dlp's answer for ``url`` (the guard's error first, when it refused or cut a fetch);
        TimeoutError when ``deadline`` (loop time) passes first."""
        async with asyncio.timeout_at(deadline):
            worker = await self._take()
            while worker.ended:  # it died idle (its zygote went, the OOM killer): cleared, and the next
                self._all.discard(worker)
                await worker.kill()
                self._top_up()
                worker = await self._take()
        guard = worker.guard
        guard.blocked.clear()
        guard.failures.clear()
        # the guard closes the job's connections at the deadline too: a page that drips is cut off
        guard.set_deadline(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                answer = await worker.ask(ExtractRequest(url=url))
        except BaseException:
            # a worker in the middle of a page is not reusable: it goes, a fresh one comes
            self._all.discard(worker)
            await worker.kill()
            self._top_up()
            raise
        guard.set_deadline(None)
        self._idle.put_nowait(worker)
        refused = guard.blocked_error()
        if refused is not None:  # a refused fetch explains any failure best
            return ExtractAnswer(error=ExtractError(refused.code.value, refused.detail, refused.retryable))
        return answer

    async def _take(self) -> _Process:
        """An idle worker, waiting GROW_AFTER_S for one before starting one more (while fewer than
        ``size``); a start that fails fails the job that asked for it at once."""
        if self._idle.empty() and len(self._all) + self._growing < self._size:
            try:
                async with asyncio.timeout(GROW_AFTER_S):
                    return await self._idle.get()
            except TimeoutError:
                if len(self._all) + self._growing < self._size:
                    return await self._first_idle(self._spawn())
        return await self._idle.get()

    async def _first_idle(self, started: asyncio.Future[None]) -> _Process:
        """The first worker to be idle, or the error of the start this job asked for."""
        getting = asyncio.ensure_future(self._idle.get())
        try:
            await asyncio.wait({started, getting}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done() and started.done() and not started.cancelled() and started.exception():
                getting.cancel()
                await asyncio.wait({getting})
                if getting.cancelled():  # nothing came free meanwhile: the start's error is the job's
                    raise started.exception()  # type: ignore[misc]
            return await getting
        except BaseException:
            # cancelled (the job's deadline, a shutdown) in the turn a worker came free: it goes back
            if getting.done() and not getting.cancelled() and getting.exception() is None:
                self._idle.put_nowait(getting.result())
            raise
        finally:
            getting.cancel()  # a cancelled get leaves its item in the queue

    def _top_up(self) -> None:
        """Start a replacement while fewer than ``warm`` workers are left (not once the pool closes)."""
        if not self._closing and len(self._all) + self._growing < self._warm:
            self._spawn()

    def _spawn(self) -> asyncio.Future[None]:
        """Start one more worker in the pool's task group; it joins the idle ones when ready. The
        future ends when it did, or with the reason it could not."""
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._group.create_task(self._replace(started))
        self._growing += 1  # counted until the task ends, however it ends (even cancelled unstarted)
        self._replacing.add(task)
        task.add_done_callback(lambda done: self._grown(done, started))
        return started

    def _grown(self, task: asyncio.Task[None], started: asyncio.Future[None]) -> None:
        self._growing -= 1
        self._replacing.discard(task)
        if not started.done():  # cancelled before it ran (the pool is closing)
            started.cancel()

    async def _replace(self, started: asyncio.Future[None]) -> None:
        try:
            worker = await self._start()
        except Exception as exc:
            log.exception("could not start an extraction worker; the pool runs one short")
            started.set_exception(exc)
            started.exception()  # retrieved: a replacement nobody waits for only logs it
            return
        except BaseException:
            started.cancel()
            raise
        self._idle.put_nowait(worker)
        started.set_result(None)

    async def _start(self) -> _Process:
        guard = await self._make_guard().__aenter__()
        try:
            try:
                pid, pidfd, sock = await (await self._zygote_up()).fork(guard.proxy_url)
            except ZygoteGone:  # died before asyncio saw it, or stuck: once more with a new one
                log.warning("the extraction zygote did not answer a fork; starting another")
                pid, pidfd, sock = await (await self._zygote_up()).fork(guard.proxy_url)
        except BaseException:
            await guard.__aexit__(None, None, None)
            raise
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_ANSWER_BYTES)
        except BaseException:
            sock.close()
            os.close(pidfd)
            await guard.__aexit__(None, None, None)
            raise
        worker = _Process(pid, pidfd, reader, writer, guard)
        self._all.add(worker)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await reader.readline()
            if line != READY:
                raise RuntimeError("extraction worker did not start")
        except BaseException:
            self._all.discard(worker)
            await worker.kill()
            raise
        return worker


async def extracted_info(pool: ExtractorPool, url: str, *, deadline: float) -> dict[str, Any]:
    """yt-dlp's processed info for ``url`` from ``pool`` (plain data); raises the coded JobError of a
    failure, ``timeout`` when ``deadline`` (loop time) passes first."""
    try:
        answer = await pool.extract(url, deadline=deadline)
    except TimeoutError:
        raise JobError(ErrorCode.TIMEOUT, "resolving the URL ran past the job's time limit") from None
    if answer.error is not None:
        raise JobError(ErrorCode(answer.error.code), answer.error.detail, retryable=answer.error.retryable)
    if answer.info is None:
        raise JobError(ErrorCode.NO_MEDIA_FOUND, "yt-dlp returned nothing")
    return answer.info


if __name__ == "__main__":
    if sys.argv[1:2] != [ZYGOTE_FLAG]:
        raise SystemExit(f"usage: python -m actors.guard.extract {ZYGOTE_FLAG} TIMEOUT MAX_BYTES (the pool starts it)")
    zygote_main(sys.argv[2:])
