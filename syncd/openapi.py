"""The OpenAPI 3 description of the control API, served at /v1.0/openapi.json (kept true by tests)."""

from __future__ import annotations

from typing import Any

from syncd import __version__

_ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {
            "type": "object",
            "required": ["msg"],
            "properties": {"msg": {"type": "string"}, "problems": {"type": "array", "items": {"type": "string"}}},
        },
    },
}


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["success", "data"],
            "properties": {"success": {"type": "boolean", "enum": [True]}, "data": data}}


_JOB = {"type": "object", "required": ["syncJobId"], "properties": {"syncJobId": {"type": "string"}}}
_NULLABLE_STR = {"type": "string", "nullable": True}
_STATUS = {
    "type": "object",
    "required": ["id", "syncJobId", "paused", "records", "pending_events", "dead_events"],
    "properties": {
        "id": {"type": "string"},
        "syncJobId": {"type": "string"},
        "origin": {"type": "string", "enum": ["file", "api"]},
        "configured": {"type": "boolean"},
        "definition": {"description": "ok | invalid | removed, or (sync.custom.get) the definition without secrets"},
        "paused": {"type": "boolean"},
        "file": {"type": "string"},
        "url": {"type": "string"},
        "interval_seconds": {"type": "number"},
        "paginated": {"type": "boolean"},
        "last_run_at": _NULLABLE_STR,
        "last_outcome": _NULLABLE_STR,
        "last_error": _NULLABLE_STR,
        "last_warning": _NULLABLE_STR,
        "last_success_at": _NULLABLE_STR,
        "last_change_at": _NULLABLE_STR,
        "records": {"type": "integer"},
        "pending_deletions": {"type": "integer"},
        "deletes_held": {"type": "integer"},
        "pending_events": {"type": "integer"},
        "dead_events": {"type": "integer"},
        "owner": {**_NULLABLE_STR, "description": "PostgreSQL state: the instance holding the sync's lease (null: none now, or SQLite)"},
    },
}
_START_BODY = {
    "type": "object",
    "description": "Knit's sync.custom.start body; any sync definition key (snake_case or Knit's camelCase) is accepted.",
    "required": ["webhookURL", "apiDetails"],
    "properties": {
        "idempotencyId": {"type": "string", "description": "The sync id; generated (sync_...) when absent."},
        "webhookURL": {"type": "string"},
        "listIdentifier": {"type": "string"},
        "recordIdentifier": {"type": "string"},
        "apiDetails": {
            "type": "object",
            "properties": {
                "method": {"type": "string"},
                "baseUrl": {"type": "string"},
                "path": {"type": "string"},
                "body": {"type": "string"},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    },
}
_JOB_BODY = {"required": True, "content": {"application/json": {"schema": _JOB}}}


def _responses(data: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "success", "content": {"application/json": {"schema": _ok(data)}}}}
    reasons = {400: "invalid request", 401: "missing or wrong API key", 404: "no such sync",
               409: "conflict with the sync's state or origin", 413: "body over 1 MiB"}
    for status in (401, *errors):
        out[str(status)] = {"description": reasons[status], "content": {"application/json": {"schema": _ERROR}}}
    return out


def _post(summary: str, data: dict[str, Any], *errors: int, body: dict[str, Any] = _JOB_BODY) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": body, "responses": _responses(data, 400, 413, *errors)}}


def document() -> dict[str, Any]:
    """The OpenAPI 3.0 document."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "syncd control API (Knit-compatible)", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1.0/sync.custom.start": _post(
                "Start a sync (idempotent on idempotencyId); written to api_config_dir", _JOB, 409,
                body={"required": True, "content": {"application/json": {"schema": _START_BODY}}}),
            "/v1.0/sync.custom.list": {"get": {
                "summary": "Every sync, file-defined ones included, with its origin and status",
                "responses": _responses({"type": "object", "required": ["syncs"],
                                         "properties": {"syncs": {"type": "array", "items": _STATUS}}})}},
            "/v1.0/sync.custom.get": {"get": {
                "summary": "One sync: its definition without secrets, status and last run",
                "parameters": [{"name": "syncJobId", "in": "query", "required": True, "schema": {"type": "string"}}],
                "responses": _responses(_STATUS, 400, 404)}},
            "/v1.0/sync.custom.pause": _post("Stop polling a sync (kept across restarts)", _JOB, 404),
            "/v1.0/sync.custom.resume": _post("Poll a paused sync again", _JOB, 404),
            "/v1.0/sync.custom.trigger": _post("Poll a sync now (409 while paused)", _JOB, 404, 409),
            "/v1.0/sync.custom.stop": _post("Remove an API-created sync and forget its state: a later start with its id is a new sync (409 for file-defined ones)", _JOB, 404, 409),
            "/v1.0/openapi.json": {"get": {"summary": "This document",
                                           "responses": {"200": {"description": "OpenAPI 3 document",
                                                                 "content": {"application/json": {"schema": {"type": "object"}}}},
                                                         "401": {"description": "missing or wrong API key",
                                                                 "content": {"application/json": {"schema": _ERROR}}}}}},
        },
    }
