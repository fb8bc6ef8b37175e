"""Pure decisions of the actor shells: job ids and stages, verification verdicts, feeder and guard args."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import msgspec

from actors.core.jobs import enter, job_id_for, may_advance, new_record, timings
from actors.core.probe import ProbeResult, ProbeStream
from actors.core.verdict import duration_ok, media_problems, object_problems, reads_whole
from actors.uploader import feeder_argv
from messages.errors import Error, ErrorCode
from messages.types import ConvertRequested, InputVia, MediaInput, MediaPlan, Stage, VerifyObject
from storage import ObjectInfo
from storage.keys import download_filename

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
REQUEST = ConvertRequested(url="https://example.com/a", format="mp3")


def test_job_id_is_the_clients_then_the_idempotency_keys_then_the_messages():
    assert job_id_for(ConvertRequested(url="https://e.com", format="mp3", job_id="order-4711"), message_id="m") \
        == "order-4711"
    keyed = ConvertRequested(url="https://e.com", format="mp3", idempotency_key="k-1")
    assert job_id_for(keyed, message_id="m1") == job_id_for(keyed, message_id="m2")
    assert job_id_for(REQUEST, message_id="m1") == job_id_for(REQUEST, message_id="m1")
    assert job_id_for(REQUEST, message_id="m1") != job_id_for(REQUEST, message_id="m2")


def test_a_result_for_another_stage_is_a_duplicate_unless_a_replay_revives_a_retryable_failure():
    record = new_record("job-00000001", REQUEST, now=T0, reply_to=None)
    assert may_advance(record, expected=Stage.PREPARING, replayed=False)
    enter(record, Stage.CONVERTING, now=T0)
    assert not may_advance(record, expected=Stage.PREPARING, replayed=False)
    enter(record, Stage.FAILED, now=T0)
    record.error = Error.of(ErrorCode.STORAGE_UNAVAILABLE)
    assert not may_advance(record, expected=Stage.CONVERTING, replayed=False)
    assert may_advance(record, expected=Stage.CONVERTING, replayed=True)
    assert not may_advance(record, expected=Stage.PREPARING, replayed=True)
    record.error = Error.of(ErrorCode.TOO_LONG)
    assert not may_advance(record, expected=Stage.CONVERTING, replayed=True), "permanent failures stay failed"


def test_timings_add_up_per_stage():
    record = new_record("job-00000001", REQUEST, now=T0, reply_to=None)
    enter(record, Stage.CONVERTING, now=T0 + timedelta(seconds=1))
    enter(record, Stage.VERIFYING, now=T0 + timedelta(seconds=4))
    enter(record, Stage.COMPLETED, now=T0 + timedelta(seconds=4.5))
    assert timings(record, now=T0 + timedelta(seconds=4.5)) == {
        "preparing": 1.0, "converting": 3.0, "verifying": 0.5, "total": 4.5}


def test_download_filename_is_the_title_without_path_or_control_characters():
    assert download_filename("My Talk: part 1/2", "mp3", "job-1") == "My Talk part 1 2.mp3"
    assert download_filename("../../etc/passwd\x00", "mp3", "job-1") == "etc passwd.mp3"
    assert download_filename("  ", "wav", "job-00000001") == "job-00000001.wav"


def verify_message(**kw) -> VerifyObject:
    base = dict(job_id="job-00000001", key="converted/a.mp3", size=1000, etag="abc", content_type="audio/mpeg",
                format="mp3", duration=10.0, expect_codecs={"audio": "mp3"})
    base.update(kw)
    return VerifyObject(**base)


def head(**kw) -> ObjectInfo:
    base = dict(key="converted/a.mp3", size=1000, etag="abc", content_type="audio/mpeg", last_modified=T0)
    base.update(kw)
    return ObjectInfo(**base)


def test_object_problems_name_size_etag_and_content_type():
    assert object_problems(head(), verify_message()) == []
    assert object_problems(None, verify_message()) == ["the object is missing from storage"]
    problems = object_problems(head(size=999, etag="zzz", content_type="video/mp4"), verify_message())
    assert len(problems) == 3 and "size 999" in problems[0] and "ETag" in problems[1]


def probe(duration: float, codec: str = "mp3", fmt: str = "mp3") -> ProbeResult:
    return ProbeResult(format_name=fmt, duration=duration,
                       streams=[ProbeStream(index=0, codec_type="audio", codec_name=codec)])


def test_media_problems_catch_a_cut_off_source_wrong_codec_and_container():
    assert media_problems(probe(10.1), verify_message()) == []
    assert "cut off" in media_problems(probe(6.0), verify_message())[0]
    assert any("codec" in p for p in media_problems(probe(10.0, codec="aac"), verify_message()))
    assert any("container" in p for p in media_problems(probe(10.0, fmt="ogg"), verify_message()))


def test_a_piped_container_is_read_whole_only_when_ffmpeg_did_not_report_what_it_produced():
    for fmt in ("mp4", "m4a", "webm", "opus", "flac"):
        assert reads_whole(verify_message(format=fmt, produced=0))
        assert not reads_whole(verify_message(format=fmt, produced=10.0))
    for fmt in ("mp3", "wav"):  # their header says how long they are
        assert not reads_whole(verify_message(format=fmt, produced=0))


def head_of_fragments(first_fragment: float) -> ProbeResult:
    """What the head of a fragmented M4A tells: container, codec, and the first fragment's length."""
    return ProbeResult(format_name="mov,mp4,m4a,3gp,3g2,mj2", duration=first_fragment,
                       streams=[ProbeStream(index=0, codec_type="audio", codec_name="aac")])


def test_the_head_of_a_piped_container_is_judged_on_ffmpegs_report_not_on_its_first_fragment():
    m4a = dict(format="m4a", content_type="audio/mp4", expect_codecs={"audio": "aac"})
    assert media_problems(head_of_fragments(1.02), verify_message(**m4a, produced=10.0)) == []
    short = media_problems(head_of_fragments(1.02), verify_message(**m4a, produced=5.0))
    assert len(short) == 1 and "cut off" in short[0] and "5.0" in short[0]
    # no report and no packets counted: nothing proves a duration, which is a problem, not a pass
    assert "cut off" in media_problems(head_of_fragments(1.02), verify_message(**m4a, produced=0))[0]
    counted = msgspec.structs.replace(head_of_fragments(1.02), packet_duration=6.0)
    assert "cut off" in media_problems(counted, verify_message(**m4a, produced=0))[0]


def test_a_header_duration_and_ffmpegs_report_must_both_match_the_plan():
    assert media_problems(probe(10.0), verify_message(produced=10.0)) == []
    assert "ffmpeg reported producing" in media_problems(probe(10.0), verify_message(produced=4.0))[0]
    assert "cut off" in media_problems(probe(4.0), verify_message(produced=10.0))[0]


def test_duration_tolerance_is_two_percent_or_half_a_second():
    assert duration_ok(10.45, 10.0) and not duration_ok(10.6, 10.0)
    assert duration_ok(101.9, 100.0) and not duration_ok(102.1, 100.0)
    assert not duration_ok(None, 10.0)


def test_a_piped_input_is_fetched_by_ytdlp_with_its_format_through_the_guard_without_config():
    plan = MediaPlan(inputs=[MediaInput(url="https://e.com/watch", via=InputVia.YTDLP_PIPE, format_id="137+140",
                                        headers={"Referer": "https://e.com"})],
                     format="mp4", quality="720",
                     content_type="video/mp4", extension="mp4", duration=10, max_bytes=1000)
    argv = feeder_argv(plan, proxy_url="http://127.0.0.1:1", timeout=7)
    assert argv[:3] == [sys.executable, "-m", "actors.guard.feeder"]
    assert argv[argv.index("--proxy") + 1] == "http://127.0.0.1:1"
    assert argv[argv.index("-f") + 1] == "137+140"
    assert argv[-2:] == ["--", "https://e.com/watch"]
    no_pipe = MediaPlan(inputs=[MediaInput(url="https://e.com/a.mp4")],
                        format="mp3", quality="192", content_type="audio/mpeg", extension="mp3", duration=1,
                        max_bytes=1)
    assert feeder_argv(no_pipe, proxy_url="http://127.0.0.1:1", timeout=7) is None


def test_object_keys_are_unguessable_even_for_client_chosen_job_ids():
    from storage.keys import object_key

    first = new_record("order-4711", REQUEST, now=T0, reply_to=None)
    second = new_record("order-4711", REQUEST, now=T0, reply_to=None)
    assert first.key_nonce != second.key_nonce and len(first.key_nonce) == 16
    key = object_key("order-4711", "mp3", now=T0, nonce=first.key_nonce)
    assert key == f"converted/2026/11/order-4711-{first.key_nonce}.mp3"


def test_a_replayed_or_expiring_stream_command_is_stale():
    from actors.core.target import stale_target
    from messages.types import StreamToStorage, UploadTarget

    plan = MediaPlan(inputs=[MediaInput(url="https://e.com/a.mp4")],
                     format="mp3", quality="192", content_type="audio/mpeg", extension="mp3", duration=1,
                     max_bytes=1)

    def command(expires: datetime, renewals: int = 0) -> StreamToStorage:
        target = UploadTarget(key="converted/a.mp3", content_type="audio/mpeg", put_url="http://127.0.0.1/x",
                              expires_at=expires.isoformat())
        return StreamToStorage(job_id="job-00000001", plan=plan, target=target, time_limit=60, renewals=renewals)

    fresh = command(T0 + timedelta(hours=1))
    assert stale_target(fresh, replays=0, now=T0) == ""
    assert "replayed" in stale_target(fresh, replays=1, now=T0)
    assert stale_target(command(T0 + timedelta(hours=1), renewals=1), replays=1, now=T0) == ""
    assert "expire" in stale_target(command(T0 + timedelta(seconds=30)), replays=0, now=T0)


def test_a_failed_stream_keeps_its_upload_only_when_the_same_command_comes_back():
    import asyncio

    from actors.uploader import keep_for_retry
    from messages.errors import JobError

    transient = JobError(ErrorCode.STORAGE_UNAVAILABLE, "503")
    assert keep_for_retry(transient, attempt=1, max_attempts=3)
    assert not keep_for_retry(transient, attempt=3, max_attempts=3), "the last attempt cleans up"
    assert not keep_for_retry(JobError(ErrorCode.TOO_LARGE), attempt=1, max_attempts=3)
    assert keep_for_retry(asyncio.CancelledError(), attempt=1, max_attempts=3), "shutdown: redelivered"
