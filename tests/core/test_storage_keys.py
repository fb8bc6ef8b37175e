"""The pure side of storage: object keys, multipart ETags, download filenames, SigV4 query signing."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from storage.keys import content_disposition, format_of_key, job_record_key, multipart_etag, object_key
from storage.sigv4 import QuerySigner, host_header

NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)


def test_object_key_is_dated_under_converted() -> None:
    assert object_key("job_ABC-123", "m4a", now=NOW) == "converted/2025/03/job_ABC-123.m4a"


@pytest.mark.parametrize(
    ("job_id", "extension"),
    [
        ("../../etc/passwd", "mp3"),
        ("job-0001/../x", "mp3"),
        ("short", "mp3"),
        ("-starts-with-dash", "mp3"),
        ("job-00000001", "../mp3"),
        ("job-00000001", "MP3"),
        ("job-00000001", ""),
        ("job-00000001", "mp3.exe"),
        ("x" * 65, "mp3"),
    ],
)
def test_object_key_refuses_anything_but_a_job_id_and_an_extension(job_id: str, extension: str) -> None:
    with pytest.raises(ValueError):
        object_key(job_id, extension, now=NOW)


def test_job_records_live_under_jobs() -> None:
    assert job_record_key("job-00000001") == "jobs/job-00000001.json"
    with pytest.raises(ValueError):
        job_record_key("../jobs")


@pytest.mark.parametrize("owner", ["../x", "a/b", "Alice", "", "a" * 33])
def test_a_tenant_s_records_live_under_its_own_prefix_and_no_owner_escapes_it(owner) -> None:
    assert job_record_key("job-00000001", owner="alice") == "jobs/alice/job-00000001.json"
    if owner:
        with pytest.raises(ValueError):
            job_record_key("job-00000001", owner=owner)
    else:  # no owner: the default tenant's key, as before tenants
        assert job_record_key("job-00000001", owner=owner) == "jobs/job-00000001.json"


def test_format_of_key_reads_the_extension_of_converted_files_only() -> None:
    assert format_of_key("converted/2025/03/job-00000001.flac") == "flac"
    assert format_of_key("jobs/job-00000001.json") is None


def test_multipart_etag_is_md5_of_binary_part_md5s_then_count() -> None:
    bodies = [b"first part", b"second"]
    etags = [f'"{hashlib.md5(body).hexdigest()}"' for body in bodies]
    expected = hashlib.md5(hashlib.md5(bodies[0]).digest() + hashlib.md5(bodies[1]).digest()).hexdigest()
    assert multipart_etag(etags) == f"{expected}-2"


def test_ascii_filename_needs_no_extended_form() -> None:
    assert content_disposition("My Song.mp3") == 'attachment; filename="My Song.mp3"'


def test_unicode_filename_gets_an_ascii_fallback_and_filename_star() -> None:
    value = content_disposition("日本の歌 — Björk.m4a")
    assert value.startswith('attachment; filename="')
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback.isascii() and fallback.endswith("Bjork.m4a")
    assert "filename*=UTF-8''%E6%97%A5%E6%9C%AC%E3%81%AE%E6%AD%8C%20%E2%80%94%20Bj%C3%B6rk.m4a" in value


def test_filename_cannot_break_the_header_or_carry_a_path() -> None:
    value = content_disposition('../evil"\r\nSet-Cookie: x.mp3')
    assert "\r" not in value and "\n" not in value
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert "/" not in fallback and '"' not in fallback


def test_query_signer_reproduces_the_aws_documented_example() -> None:
    # https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html
    signer = QuerySigner(
        access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        expires=86400,
        now=datetime(2013, 5, 24, tzinfo=UTC),
    )
    url = signer.presign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {})
    assert url.endswith("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


def test_host_header_drops_default_ports_only() -> None:
    assert host_header("http", "127.0.0.1:80") == "127.0.0.1"
    assert host_header("https", "s3.example:443") == "s3.example"
    assert host_header("http", "127.0.0.1:9000") == "127.0.0.1:9000"
    assert host_header("https", "[::1]:9000") == "[::1]:9000"
