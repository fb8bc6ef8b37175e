"""The HTTP gateway: the REST API, live progress over Server-Sent Events, stats, metrics, the demo page.

``app.make_app`` assembles the aiohttp application; ``app.run_gateway`` is ``getgoodtape run gateway``.
"""
