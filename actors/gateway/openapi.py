"""The OpenAPI 3.1 document of the API; every schema is generated from the msgspec Structs."""

from __future__ import annotations

from typing import Any

import msgspec

from actors.gateway import views
from messages.codec import SCHEMA_VERSION
from messages.types import ConvertRequested, JobCompleted, JobFailed, JobProgress

#: the types whose schemas the document carries, in the order they appear in components
SCHEMA_TYPES: tuple[type, ...] = (
    ConvertRequested, views.Accepted, views.JobView, views.ErrorBody, views.StatsView, views.Formats,
    views.Health, JobProgress, JobCompleted, JobFailed,
)
REF = "#/components/schemas/{name}"


def _ref(cls: type) -> dict[str, str]:
    return {"$ref": REF.format(name=cls.__name__)}


def _json(cls: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(cls)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {400: "invalid request (code invalid_request, field names the JSON path)",
               401: "missing or wrong API key (code unauthorized)",
               404: "unknown job, or another tenant's (code job_not_found)",
               409: "the job has not completed (job_not_finished) or failed (its own error code)",
               429: "rate limit or failed-authentication limit reached (code rate_limited; Retry-After), or "
                    "too many open event streams for the key (code too_many_streams)",
               503: "broker or storage unavailable"}
    return {str(s): _json(views.ErrorBody, meaning[s]) for s in statuses}


_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_document(*, auth: bool) -> dict[str, Any]:
    """The document; ``auth`` says whether the job endpoints require a bearer key."""
    _, components = msgspec.json.schema_components(SCHEMA_TYPES, ref_template=REF)
    # over HTTP the endpoint names the message, so the body may leave out its ``type`` tag
    request_schema = components["ConvertRequested"]
    request_schema["required"] = [f for f in request_schema.get("required", []) if f != "type"]
    secured = [{"bearer": []}] if auth else []
    paths: dict[str, Any] = {
        "/api/convert": {"post": {
            "summary": "Start a conversion (publishes ConvertRequested; the coordinator does the rest)",
            "security": secured,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ConvertRequested)}}},
            "responses": {"202": _json(views.Accepted, "accepted: the job id and where to follow it"),
                          **_errors(400, 401, 429, 503)},
        }},
        "/api/jobs/{job_id}": {"get": {
            "summary": "The job record: stage, percent, result or error", "security": secured,
            "parameters": [_JOB_ID],
            "responses": {"200": _json(views.JobView, "the job"), **_errors(401, 404, 429, 503)},
        }},
        "/api/jobs/{job_id}/events": {"get": {
            "summary": "Server-Sent Events: progress, then completed or failed (resumable with Last-Event-ID)",
            "security": secured,
            "parameters": [_JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                     "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "text/event-stream; event names progress | completed | failed, data "
                                       "JobProgress | JobCompleted | JobFailed as JSON",
                        "content": {"text/event-stream": {"schema": {"oneOf": [
                            _ref(JobProgress), _ref(JobCompleted), _ref(JobFailed)]}}}},
                "204": {"description": "the client already saw the job's final event: stop reconnecting"},
                **_errors(401, 404, 429),
            },
        }},
        "/api/jobs/{job_id}/download": {"get": {
            "summary": "302 to a fresh presigned download URL of the stored file", "security": secured,
            "parameters": [_JOB_ID],
            "responses": {"302": {"description": "Location: the presigned URL"}, **_errors(401, 404, 409, 429)},
        }},
        "/api/storage/stats": {"get": {
            "summary": "Stored files by format, open uploads, success rates and processing time",
            "security": secured,
            "responses": {"200": _json(views.StatsView, "the figures"), **_errors(401, 429, 503)},
        }},
        "/api/formats": {"get": {
            "summary": "Output formats and the qualities each accepts", "security": [],
            "responses": {"200": _json(views.Formats, "formats")},
        }},
        "/healthz": {"get": {"summary": "The process is alive", "security": [],
                             "responses": {"200": _json(views.Health, "alive")}}},
        "/readyz": {"get": {"summary": "Broker and storage reachable (the verdict is reused for seconds)",
                            "security": [],
                            "responses": {"200": _json(views.Health, "ready"),
                                          "503": _json(views.Health, "not ready: checks say which failed"),
                                          **_errors(429)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format)", "security": [],
                             "responses": {"200": {"description": "text/plain; version=0.0.4"},
                                           **_errors(429)}}},
        "/api/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "GetGoodTape API", "version": SCHEMA_VERSION,
                 "description": "Turn media URLs into verified files in S3-compatible storage. See docs/API.md."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": secured,
    }
