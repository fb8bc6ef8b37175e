"""The HTTP gateway: the API, its edges, fuzzing, tenants."""
