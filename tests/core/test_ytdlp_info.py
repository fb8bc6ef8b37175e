"""Format choice, SourceInfo and yt-dlp error codes from plain info dicts shaped like yt-dlp's. No I/O."""

from __future__ import annotations

from typing import Any

import pytest

from actors.core.plan import Limits, plan_media
from actors.core.probe import ProbeResult, ProbeStream
from actors.core.ytdlp_info import (
    best_thumbnail,
    cookie_header,
    input_via,
    probe_target,
    request_headers,
    select_formats,
    source_info,
    with_probe,
    ytdlp_error,
)
from messages.errors import ErrorCode, JobError
from messages.types import ConvertRequested, Format, InputVia, Quality

PAGE = "https://www.youtube.com/watch?v=aaaaaaaaaaa"
HEADERS = {"User-Agent": "Mozilla/5.0", "Accept": "*/*", "Accept-Language": "en-us,en;q=0.5"}
#: yt-dlp's ``cookies`` field: Set-Cookie-like, attributes after each cookie
COOKIES = ("VISITOR_INFO1_LIVE=abc; Domain=.youtube.com; Path=/; Secure; Expires=1800000000; "
           "YSC=xyz; Domain=.youtube.com; Path=/; Secure")
LIMITS = Limits(max_duration=4 * 3600, max_output_bytes=4 * 1024**3)


def fmt(format_id: str, *, vcodec: str | None, acodec: str | None, protocol: str = "https", **kw: Any) -> dict:
    """One format as yt-dlp lists it."""
    return {"format_id": format_id, "url": f"https://rr1.example.invalid/videoplayback?itag={format_id}",
            "vcodec": vcodec, "acodec": acodec, "protocol": protocol,
            "http_headers": dict(HEADERS), "cookies": COOKIES, **kw}


def youtube_like() -> dict:
    """A YouTube-like watch page: storyboards, audio-only, video-only and one combined format, worst → best."""
    formats = [
        fmt("sb0", vcodec="none", acodec="none", protocol="mhtml", ext="mhtml"),
        fmt("139", vcodec="none", acodec="mp4a.40.5", abr=48.8, asr=22050, audio_channels=2, ext="m4a"),
        fmt("140", vcodec="none", acodec="mp4a.40.2", abr=129.5, asr=44100, audio_channels=2, ext="m4a"),
        fmt("251", vcodec="none", acodec="opus", abr=135.2, asr=48000, audio_channels=2, ext="webm"),
        fmt("18", vcodec="avc1.42001E", acodec="mp4a.40.2", height=360, tbr=500.0, ext="mp4"),
        fmt("134", vcodec="avc1.4D401E", acodec="none", height=360, tbr=300.0, ext="mp4"),
        fmt("243", vcodec="vp9", acodec="none", height=360, tbr=280.0, ext="webm"),
        fmt("136", vcodec="avc1.4d401f", acodec="none", height=720, tbr=1500.0, ext="mp4"),
        fmt("247", vcodec="vp9", acodec="none", height=720, tbr=1400.0, ext="webm"),
        fmt("398", vcodec="av01.0.05M.08", acodec="none", height=720, tbr=1100.0, ext="mp4"),
        fmt("137", vcodec="avc1.640028", acodec="none", height=1080, tbr=4000.0, ext="mp4"),
        fmt("248", vcodec="vp9", acodec="none", height=1080, tbr=2600.0, ext="webm"),
    ]
    return {
        "id": "aaaaaaaaaaa", "title": "A song", "artist": "The Band", "uploader": "The Band - Topic",
        "duration": 212, "upload_date": "20240131", "webpage_url": PAGE, "extractor": "youtube",
        "live_status": "not_live", "is_live": False, "formats": formats,
        "thumbnails": [
            {"url": "https://i.ytimg.com/vi/aaaaaaaaaaa/default.jpg", "preference": -10},
            {"url": "https://i.ytimg.com/vi/aaaaaaaaaaa/maxresdefault.jpg", "preference": 0},
        ],
        "thumbnail": "https://i.ytimg.com/vi/aaaaaaaaaaa/maxresdefault.jpg",
    }


def direct_mp3() -> dict:
    """What the generic extractor returns for a direct .mp3 link: one format, codec from the extension, no duration."""
    url = "http://127.0.0.1:8000/audio.mp3"
    one = {"format_id": "mpeg", "url": url, "ext": "mp3", "vcodec": "none", "acodec": "mp3", "protocol": "http",
           "http_headers": dict(HEADERS)}
    return {"id": "audio", "title": "audio", "direct": True, "webpage_url": url, "extractor": "generic",
            "formats": [one], **one}


def direct_mp4() -> dict:
    """The generic extractor on a direct .mp4 link: nothing known but the URL."""
    url = "http://127.0.0.1:8000/clip.mp4"
    one = {"format_id": "mp4", "url": url, "ext": "mp4", "vcodec": None, "protocol": "http",
           "http_headers": dict(HEADERS)}
    return {"id": "clip", "title": "clip", "direct": True, "webpage_url": url, "formats": [one], **one}


def hls() -> dict:
    """The generic extractor on an HLS media playlist: duration from the playlist, codecs unknown."""
    url = "http://127.0.0.1:8000/hls/index.m3u8"
    one = {"format_id": "0", "url": url, "ext": "mp4", "protocol": "m3u8_native", "http_headers": dict(HEADERS)}
    return {"id": "index", "title": "index", "duration": 6, "webpage_url": url, "formats": [one], **one}


def dash_only() -> dict:
    """A site offering only DASH (fragmented) formats, which ffmpeg cannot read from yt-dlp's info."""
    return {
        "id": "d1", "title": "DASH only", "duration": 30.0, "webpage_url": "https://video.example.invalid/d1",
        "formats": [
            fmt("a1", vcodec="none", acodec="mp4a.40.2", abr=128.0, protocol="http_dash_segments"),
            fmt("v1", vcodec="avc1.4d401f", acodec="none", height=720, tbr=2000.0, protocol="http_dash_segments"),
        ],
    }


def req(fmt_: Format, quality: Quality | None = None, **kw: Any) -> ConvertRequested:
    return ConvertRequested(url=PAGE, format=fmt_, quality=quality, **kw)


def ids(info: dict, fmt_: Format, quality: Quality) -> list[tuple[str, str]]:
    return [(c.format["format_id"], c.kind) for c in select_formats(info["formats"], fmt=fmt_, quality=quality)]


# --- choosing formats on a YouTube-like page


def test_mp4_720_takes_the_h264_720p_video_and_the_aac_audio() -> None:
    assert ids(youtube_like(), Format.MP4, Quality.P720) == [("136", "video"), ("140", "audio")]


def test_webm_720_takes_the_vp9_720p_video_and_the_opus_audio() -> None:
    assert ids(youtube_like(), Format.WEBM, Quality.P720) == [("247", "video"), ("251", "audio")]


def test_best_video_takes_the_tallest_in_the_fitting_codec() -> None:
    assert ids(youtube_like(), Format.MP4, Quality.BEST)[0] == ("137", "video")
    assert ids(youtube_like(), Format.WEBM, Quality.BEST)[0] == ("248", "video")


def test_height_beats_codec_fit_when_the_fitting_codec_is_only_smaller() -> None:
    info = youtube_like()
    info["formats"] = [f for f in info["formats"] if f["format_id"] not in ("136", "137")]
    # no h264 at 720p any more: the 720p VP9 (highest bitrate there) is taken and transcoded
    assert ids(info, Format.MP4, Quality.P720)[0] == ("247", "video")


def test_a_limit_below_every_video_takes_the_smallest_one_above_it() -> None:
    info = youtube_like()
    info["formats"] = [f for f in info["formats"] if (f.get("height") or 0) >= 720 or f["vcodec"] == "none"]
    assert ids(info, Format.MP4, Quality.P480)[0] == ("136", "video")


def test_combined_format_is_taken_when_it_is_better_than_any_video_only_one() -> None:
    info = youtube_like()
    info["formats"] = [f for f in info["formats"] if f["format_id"] in ("139", "140", "18", "243")]
    assert ids(info, Format.MP4, Quality.P720) == [("18", "av")]


def test_m4a_best_prefers_the_aac_that_can_be_copied_over_a_higher_opus_bitrate() -> None:
    assert ids(youtube_like(), Format.M4A, Quality.BEST) == [("140", "audio")]
    assert ids(youtube_like(), Format.OPUS, Quality.BEST) == [("251", "audio")]


def test_mp3_takes_the_highest_bitrate_audio_only_format() -> None:
    assert ids(youtube_like(), Format.MP3, Quality.K192) == [("251", "audio")]
    assert ids(youtube_like(), Format.MP3, Quality.BEST) == [("251", "audio")]


def test_audio_from_a_page_without_audio_only_formats_comes_from_the_best_combined_one() -> None:
    info = youtube_like()
    info["formats"] = [f for f in info["formats"] if f["acodec"] == "none" or f["format_id"] == "18"]
    assert ids(info, Format.MP3, Quality.K192) == [("18", "av")]


def test_source_info_of_a_youtube_like_page_for_mp4_720() -> None:
    source = source_info(youtube_like(), req(Format.MP4, Quality.P720))
    video, audio = source.inputs
    assert (video.kind, audio.kind) == ("video", "audio")
    assert video.url.endswith("itag=136") and audio.url.endswith("itag=140")
    assert {i.via for i in source.inputs} == {InputVia.FFMPEG}
    assert video.headers["Cookie"] == "VISITOR_INFO1_LIVE=abc; YSC=xyz"
    assert video.headers["User-Agent"] == "Mozilla/5.0"
    assert (source.video_codec, source.audio_codec, source.height) == ("h264", "aac", 720)
    assert (source.vbr, source.abr, source.tbr) == (1500.0, 129.5, None)
    assert (source.sample_rate, source.channels) == (44100, 2)
    assert (source.duration, source.title, source.artist, source.upload_date) == (212.0, "A song", "The Band",
                                                                                   "20240131")
    assert source.thumbnail_url == "https://i.ytimg.com/vi/aaaaaaaaaaa/maxresdefault.jpg"
    assert probe_target(source) is None  # yt-dlp said everything a plan needs
    plan = plan_media(request=req(Format.MP4, Quality.P720), source=source, limits=LIMITS)
    assert plan.video is not None and plan.video.copy
    assert plan.duration == 212


# --- a direct mp3 link, an unknown direct file, HLS


def test_direct_mp3_link_is_one_audio_input_to_probe_for_its_duration() -> None:
    source = source_info(direct_mp3(), req(Format.MP3))
    [only] = source.inputs
    assert (only.url, only.kind, only.via, only.protocol) == ("http://127.0.0.1:8000/audio.mp3", "audio",
                                                              InputVia.FFMPEG, "http")
    assert source.duration is None and source.audio_codec == "mp3"
    assert probe_target(source) == only


def test_probe_fills_in_what_yt_dlp_did_not_know() -> None:
    source = source_info(direct_mp4(), req(Format.MP4, Quality.BEST))
    assert (source.has_audio, source.has_video, source.duration) == (True, True, None)
    probed = with_probe(source, ProbeResult(
        format_name="mov,mp4,m4a,3gp,3g2,mj2", duration=6.0, bit_rate=400_000,
        streams=[ProbeStream(index=0, codec_type="video", codec_name="h264", height=240, bit_rate=300_000),
                 ProbeStream(index=1, codec_type="audio", codec_name="aac", sample_rate=48000, channels=2,
                             bit_rate=128_000)],
    ))
    assert (probed.duration, probed.video_codec, probed.audio_codec, probed.height) == (6.0, "h264", "aac", 240)
    assert (probed.vbr, probed.abr, probed.tbr, probed.sample_rate) == (300.0, 128.0, 400.0, 48000)
    plan = plan_media(request=req(Format.MP4, Quality.BEST), source=probed, limits=LIMITS)
    assert plan.video.copy and plan.audio.copy  # both streams remuxed


def test_probe_decides_which_streams_a_single_direct_file_has() -> None:
    source = source_info(direct_mp4(), req(Format.MP3))
    video_only = ProbeResult(format_name="mp4", duration=6.0,
                             streams=[ProbeStream(index=0, codec_type="video", codec_name="h264", height=240)])
    probed = with_probe(source, video_only)
    assert (probed.has_audio, probed.has_video) == (False, True)
    with pytest.raises(JobError) as caught:
        plan_media(request=req(Format.MP3), source=probed, limits=LIMITS)
    assert caught.value.code is ErrorCode.NO_MEDIA_FOUND


def test_hls_playlist_is_read_by_ffmpeg_and_probed_for_its_codecs() -> None:
    source = source_info(hls(), req(Format.M4A))
    [only] = source.inputs
    assert only.via is InputVia.FFMPEG and only.is_hls
    assert source.duration == 6.0
    assert probe_target(source) == only  # duration known, codecs not


# --- DASH and other protocols ffmpeg should not read itself


@pytest.mark.parametrize(
    ("protocol", "via"),
    [("http", InputVia.FFMPEG), ("https", InputVia.FFMPEG), ("m3u8", InputVia.FFMPEG),
     ("m3u8_native", InputVia.FFMPEG), ("http_dash_segments", InputVia.YTDLP_PIPE),
     ("http_dash_segments_generator", InputVia.YTDLP_PIPE), ("ism", InputVia.YTDLP_PIPE),
     ("f4m", InputVia.YTDLP_PIPE), ("rtmp", InputVia.YTDLP_PIPE), ("websocket_frag", InputVia.YTDLP_PIPE)],
)
def test_protocols_map_to_how_ffmpeg_reads_the_input(protocol: str, via: InputVia) -> None:
    assert input_via(protocol) is via


def test_dash_only_audio_goes_through_one_ytdlp_pipe_from_the_page() -> None:
    source = source_info(dash_only(), req(Format.MP3))
    [only] = source.inputs
    assert (only.via, only.kind, only.url) == (InputVia.YTDLP_PIPE, "audio", "https://video.example.invalid/d1")
    assert probe_target(source) is None


def test_dash_only_video_and_audio_share_the_one_pipe_ffmpeg_has() -> None:
    source = source_info(dash_only(), req(Format.MP4, Quality.P720))
    [only] = source.inputs
    assert (only.via, only.kind) == (InputVia.YTDLP_PIPE, "av")
    plan = plan_media(request=req(Format.MP4, Quality.P720), source=source, limits=LIMITS)
    assert len(plan.inputs) == 1 and plan.inputs[0].via is InputVia.YTDLP_PIPE


# --- refusals


@pytest.mark.parametrize("live", [{"is_live": True}, {"live_status": "is_live"}, {"live_status": "is_upcoming"},
                                  {"live_status": "post_live"}])
def test_live_and_upcoming_streams_are_refused(live: dict) -> None:
    info = {**youtube_like(), "is_live": False, **live}
    with pytest.raises(JobError) as caught:
        source_info(info, req(Format.MP3))
    assert caught.value.code is ErrorCode.LIVE_NOT_SUPPORTED


def test_a_finished_broadcast_is_fine() -> None:
    info = {**youtube_like(), "live_status": "was_live"}
    assert source_info(info, req(Format.MP3)).inputs


def test_playlist_is_refused_unless_allowed_then_its_first_entry_is_taken() -> None:
    first, second = youtube_like(), {**youtube_like(), "title": "Second"}
    playlist = {"_type": "playlist", "id": "PL1", "title": "A list", "entries": [first, second]}
    with pytest.raises(JobError) as caught:
        source_info(playlist, req(Format.MP3))
    assert caught.value.code is ErrorCode.INVALID_REQUEST and "allow_playlist" in caught.value.detail
    assert source_info(playlist, req(Format.MP3, allow_playlist=True)).title == "A song"


def test_empty_playlist_has_no_media() -> None:
    with pytest.raises(JobError) as caught:
        source_info({"_type": "playlist", "entries": []}, req(Format.MP3, allow_playlist=True))
    assert caught.value.code is ErrorCode.NO_MEDIA_FOUND


@pytest.mark.parametrize("formats", [[], [fmt("sb0", vcodec="none", acodec="none", protocol="mhtml")],
                                     [fmt("1", vcodec="avc1", acodec="mp4a.40.2", has_drm=True)]])
def test_no_playable_format_is_no_media_found(formats: list) -> None:
    with pytest.raises(JobError) as caught:
        source_info({"id": "x", "title": "x", "formats": formats}, req(Format.MP3))
    assert caught.value.code is ErrorCode.NO_MEDIA_FOUND


def test_video_output_from_an_audio_only_source_is_refused_by_the_plan() -> None:
    source = source_info(direct_mp3(), req(Format.MP4))
    assert source.has_video is False
    with pytest.raises(JobError) as caught:
        plan_media(request=req(Format.MP4), source=with_probe(source, ProbeResult(
            format_name="mp3", duration=6.0, streams=[ProbeStream(index=0, codec_type="audio", codec_name="mp3")],
        )), limits=LIMITS)
    assert caught.value.code is ErrorCode.NO_MEDIA_FOUND


# --- headers, cookies, thumbnails


def test_cookies_become_one_cookie_header_without_their_attributes() -> None:
    assert cookie_header(COOKIES) == "VISITOR_INFO1_LIVE=abc; YSC=xyz"
    assert cookie_header(None) == "" and cookie_header("") == ""
    assert "Cookie" not in request_headers({"http_headers": {"Referer": "https://a.example/"}})
    assert request_headers({"http_headers": {"Referer": "https://a.example/"}, "cookies": "k=v; Path=/"}) == {
        "Referer": "https://a.example/", "Cookie": "k=v"}


def test_best_thumbnail_is_the_last_http_one_else_the_single_thumbnail() -> None:
    assert best_thumbnail(youtube_like()) == "https://i.ytimg.com/vi/aaaaaaaaaaa/maxresdefault.jpg"
    assert best_thumbnail({"thumbnail": "http://127.0.0.1:1/t.jpg"}) == "http://127.0.0.1:1/t.jpg"
    assert best_thumbnail({"thumbnails": [{"url": "https://a.example/t.jpg"}, {"url": "data:image/png;base64,AA"}]}) \
        == "https://a.example/t.jpg"
    assert best_thumbnail({}) is None


# --- yt-dlp's error messages → codes (strings as yt-dlp prints them)


@pytest.mark.parametrize(
    ("message", "code", "retryable"),
    [
        ("ERROR: [generic] missing: Unable to download webpage: HTTP Error 404: Not Found "
         "(caused by <HTTPError 404: Not Found>)", ErrorCode.MEDIA_REMOVED, False),
        ("ERROR: [generic] gone: Unable to download webpage: HTTP Error 410: Gone (caused by <HTTPError 410: Gone>)",
         ErrorCode.MEDIA_REMOVED, False),
        ("ERROR: [generic] x: Unable to download webpage: HTTP Error 403: Forbidden "
         "(caused by <HTTPError 403: Forbidden>)", ErrorCode.MEDIA_UNAVAILABLE, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Video unavailable. This video is no longer available because the YouTube "
         "account associated with this video has been terminated.", ErrorCode.MEDIA_REMOVED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Video unavailable. This video has been removed by the uploader",
         ErrorCode.MEDIA_REMOVED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: This video has been removed for violating YouTube's policy on hate speech.",
         ErrorCode.MEDIA_REMOVED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Private video. Sign in if you've been granted access to this video",
         ErrorCode.LOGIN_REQUIRED, False),
        ("ERROR: [vimeo] 123: This video is only available for registered users. Use --cookies, "
         "--cookies-from-browser, --username and --password, --netrc-cmd, or --netrc (vimeo) to provide account "
         "credentials", ErrorCode.LOGIN_REQUIRED, False),
        ("ERROR: [youtube:tab] UCxxxx: Login details are needed to download this content. Use "
         "--cookies-from-browser or --cookies for the authentication.", ErrorCode.LOGIN_REQUIRED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Sign in to confirm your age. This video may be inappropriate for some "
         "users. Use --cookies-from-browser or --cookies for the authentication.", ErrorCode.AGE_RESTRICTED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: This video is available to this channel's members on level: Tier 1 "
         "(or any higher level). Join this channel to get access to the members-only content and other "
         "exclusive perks.", ErrorCode.MEMBERS_ONLY, False),
        ("ERROR: [SomeSite] 42: This video is not available from your location due to geo restriction. You "
         "might want to use a VPN or a proxy server (with --proxy) to workaround.", ErrorCode.GEO_BLOCKED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Video unavailable. The uploader has not made this video available in your "
         "country", ErrorCode.GEO_BLOCKED, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Join this channel to get access to members-only content like this video, "
         "and other exclusive perks.", ErrorCode.MEMBERS_ONLY, False),
        ("ERROR: [twitch:stream] somechannel: The channel is not currently live", ErrorCode.MEDIA_UNAVAILABLE, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Sign in to confirm you’re not a bot. Use --cookies-from-browser or --cookies "
         "for the authentication.", ErrorCode.BOT_CHECK, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Video unavailable. YouTube is requiring a captcha challenge before "
         "playback", ErrorCode.BOT_CHECK, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Video unavailable. This content isn't available, try again later.",
         ErrorCode.RATE_LIMITED, True),
        ("ERROR: [generic] x: Unable to download webpage: The read operation timed out "
         "(caused by TransportError('The read operation timed out'))", ErrorCode.MEDIA_UNAVAILABLE, True),
        ("ERROR: [generic] x: Unable to download webpage: [Errno 111] Connection refused "
         "(caused by TransportError('[Errno 111] Connection refused'))", ErrorCode.MEDIA_UNAVAILABLE, True),
        ("ERROR: [generic] x: Unable to download webpage: HTTP Error 429: Too Many Requests "
         "(caused by <HTTPError 429: Too Many Requests>)", ErrorCode.RATE_LIMITED, True),
        ("ERROR: [generic] x: Unable to download webpage: HTTP Error 503: Service Unavailable "
         "(caused by <HTTPError 503: Service Unavailable>)", ErrorCode.MEDIA_UNAVAILABLE, True),
        ("ERROR: [youtube] aaaaaaaaaaa: This live event will begin in 3 hours.", ErrorCode.LIVE_NOT_SUPPORTED, False),
        ("ERROR: [vimeo] 123456: This live event is scheduled for 2025-01-01T10:00:00Z",
         ErrorCode.LIVE_NOT_SUPPORTED, False),
        ("ERROR: [vimeo] 123456: No video formats found!", ErrorCode.NO_MEDIA_FOUND, False),
        ("ERROR: [youtube] aaaaaaaaaaa: Requested format is not available. Use --list-formats for a list of "
         "available formats", ErrorCode.NO_MEDIA_FOUND, False),
        ("ERROR: [youtube] aaaaaaaaaaa: This video is DRM protected", ErrorCode.NO_MEDIA_FOUND, False),
        ("file:// URLs are disabled by default in yt-dlp for security reasons. Use --enable-file-urls to enable at "
         "your own risk.", ErrorCode.UNSUPPORTED_URL, False),
        ("ERROR: [SomeSite] 42: Unable to extract video data; please report this issue on  "
         "https://github.com/yt-dlp/yt-dlp/issues?q= , filling out the appropriate issue template.",
         ErrorCode.MEDIA_UNAVAILABLE, True),
    ],
)
def test_ytdlp_error_messages_map_to_codes(message: str, code: ErrorCode, retryable: bool) -> None:
    error = ytdlp_error(message, by_generic=False)
    assert (error.code, error.retryable) == (code, retryable)
    assert not error.detail.startswith("ERROR:")


def test_unsupported_url_means_no_media_from_the_generic_extractor_and_unsupported_from_a_site() -> None:
    message = "ERROR: Unsupported URL: http://127.0.0.1:33657/empty.html"
    assert ytdlp_error(message, by_generic=True).code is ErrorCode.NO_MEDIA_FOUND
    assert ytdlp_error("ERROR: Unsupported URL: https://www.youtube.com/feed/library",
                       by_generic=False).code is ErrorCode.UNSUPPORTED_URL
