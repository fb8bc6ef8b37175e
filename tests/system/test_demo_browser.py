"""The /file-flow-demo page in a real headless Chromium, against the gateway and the pipeline in-process.

Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``); Selenium
drives them with the driver path set, so Selenium Manager never downloads anything. Every hostname
but 127.0.0.1 is unresolvable inside the browser: the page and the file come from loopback only.
Set ``GGT_DEMO_SCREENSHOT=docs/file-flow-demo.png`` to refresh the screenshot in the docs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestServer

from actors.adapters.ffprobe import ffprobe
from actors.gateway.app import make_app
from tests.fixtures.media import STANDARD_SECONDS

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: seconds the page may take to show a finished job
JOB_TIMEOUT_S = 120
#: browser flags: headless, no sandbox (root in CI), and nothing that phones home
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--disable-dev-shm-usage",
    "--disable-features=Translate,MediaRouter,OptimizationHints", "--window-size=1400,1000",
    # every name but 127.0.0.1 fails to resolve: the browser can reach loopback only
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("Chromium is missing: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def drive_demo(page_url: str, media_url: str, screenshots: list[Path], profile: Path) -> dict[str, str]:
    """Open the demo, submit ``media_url`` as mp3, wait for 100 %; what the page then shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _browser(profile)
    try:
        driver.get(page_url)
        wait = WebDriverWait(driver, JOB_TIMEOUT_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "format")).options) > 0)
        driver.find_element(By.ID, "url").send_keys(media_url)
        Select(driver.find_element(By.ID, "format")).select_by_value("mp3")
        Select(driver.find_element(By.ID, "quality")).select_by_value("192")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "bar").get_attribute("aria-valuenow") == "100"
                   or d.find_element(By.ID, "error").is_displayed())
        wait.until(ec.visibility_of_element_located((By.ID, "download-link")))
        # the figures refresh when the job ends: wait for them to count it
        wait.until(lambda d: d.find_element(By.ID, "jobs").text.startswith("1 /"))
        for path in screenshots:
            driver.save_screenshot(str(path))
        return {
            "percent": driver.find_element(By.ID, "percent").text,
            "stage": driver.find_element(By.ID, "stage").text,
            "bar": driver.find_element(By.ID, "bar").get_attribute("aria-valuenow"),
            "href": driver.find_element(By.ID, "download-link").get_attribute("href"),
            "error": driver.find_element(By.ID, "error").text,
            "coordinator_bytes": driver.find_element(By.ID, "coordinator-bytes").text,
            "streamed_bytes": driver.find_element(By.ID, "streamed-bytes").text,
            "verify_rate": driver.find_element(By.ID, "rate-verify").text,
        }
    finally:
        driver.quit()


async def test_the_demo_page_converts_a_loopback_source_and_links_the_decodable_file(
        pipeline, media_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, if ever consulted, must not download
    settings = msgspec.structs.replace(pipeline.settings, rate_limit_per_minute=0)
    app = make_app(settings, bus=pipeline.bus, storage=pipeline.storage)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    screenshots = [tmp_path / "file-flow-demo.png"]
    if target := os.environ.get("GGT_DEMO_SCREENSHOT"):
        screenshots.append(Path(target))
    try:
        shown = await asyncio.to_thread(drive_demo, str(server.make_url("/file-flow-demo")),
                                        media_server.url("av_h264_aac.mp4"), screenshots, tmp_path / "profile")
    finally:
        await server.close()

    assert shown["error"] == ""
    assert shown["bar"] == "100" and shown["percent"] == "100 %" and shown["stage"] == "completed"
    assert shown["coordinator_bytes"] == "0 B", "the coordinator's measured file bytes"
    assert shown["streamed_bytes"] != "0 B" and shown["verify_rate"] == "100.0 %"
    assert screenshots[0].stat().st_size > 10_000

    finals = list(pipeline.finals.values())
    assert len(finals) == 1 and shown["href"] == finals[0].download_url
    async with aiohttp.ClientSession() as http, http.get(shown["href"]) as response:
        assert response.status == 200
        data = await response.read()
    assert hashlib.sha256(data).hexdigest() == finals[0].sha256
    probe = await ffprobe(shown["href"], timeout=60)
    assert probe.first("audio").codec_name == "mp3"
    assert abs(probe.best_duration - STANDARD_SECONDS) <= 0.5


def drive_until_completed(page_url: str, profile: Path) -> dict[str, object]:
    """Open the demo, submit a URL, wait for the completed stage; the download link as the page shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _browser(profile)
    try:
        driver.get(page_url)
        wait = WebDriverWait(driver, JOB_TIMEOUT_S)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "format")).options) > 0)
        driver.find_element(By.ID, "url").send_keys("http://127.0.0.1/a.mp3")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "stage").text == "completed")
        link = driver.find_element(By.ID, "download-link")
        return {"href": link.get_attribute("href"), "shown": link.is_displayed()}
    finally:
        driver.quit()


async def test_the_demo_page_follows_no_download_link_but_http_and_https(storage, tmp_path, monkeypatch):
    """A completed event whose download_url is ``javascript:`` (a forged or broken event) gives no link."""
    from actors.bootstrap.wiring import topology
    from actors.core.jobs import encode_record, enter, new_record, utcnow
    from bus.memory import MemoryBus
    from messages.types import ConvertRequested, JobCompleted, Stage
    from storage import JobStore
    from tests.fixtures.broker import test_settings

    monkeypatch.setenv("SE_OFFLINE", "true")
    settings = test_settings(rate_limit_per_minute=0)
    bus = MemoryBus(topology(settings))
    await bus.start()

    async def coordinator_that_completes_with_a_script_link() -> None:
        """Stands in for the coordinator: records the job completed with a javascript: URL, announces it."""
        async for delivery in bus.deliveries("coordinator", prefetch=1):
            request = msgspec.json.decode(delivery.body, type=ConvertRequested)
            record = new_record(request.job_id, request, now=utcnow(), reply_to=None)
            enter(record, Stage.COMPLETED, now=utcnow(), percent=100.0)
            record.result = JobCompleted(
                job_id=request.job_id, download_url="javascript:alert(document.domain)//", expires_at="",
                key="converted/x.mp3", format="mp3", quality="192", content_type="audio/mpeg", size=1,
                sha256="0" * 64, duration=1.0, title="x")
            await JobStore(storage).save(request.job_id, encode_record(record), etag=None)
            await bus.publish(record.result)
            await delivery.ack()

    server = TestServer(make_app(settings, bus=bus, storage=storage), host="127.0.0.1")
    await server.start_server()
    fake = asyncio.create_task(coordinator_that_completes_with_a_script_link())
    try:
        shown = await asyncio.to_thread(drive_until_completed, str(server.make_url("/file-flow-demo")),
                                        tmp_path / "profile")
    finally:
        fake.cancel()
        await server.close()
        await bus.close()
    assert not str(shown["href"]).startswith("javascript:"), shown
    assert shown["shown"] is False, "no link is offered at all"
