"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py, registered here."""

pytest_plugins = [
    "tests.fixtures.broker",
    "tests.fixtures.s3",
    "tests.fixtures.media",
    "tests.fixtures.pipeline",
]
