"""The SSRF guard and hostile sources, end to end on loopback."""
