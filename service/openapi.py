"""The OpenAPI 3.0 description of the HTTP API in :mod:`service.http`, served at ``/openapi.json``.

Written by hand next to the routes rather than generated from docstrings: the parameter
constraints and response shapes here are what the property-based tests (schemathesis)
generate requests from and check answers against, so they are spelled out exactly. A test
checks that every route of the app is described here and nothing else.
"""

from __future__ import annotations

import copy
from typing import Any

from service.metrics import TIMED_STAGES
from service.store import JobState

__all__ = ["MAX_JOB_ID", "MAX_LIMIT", "MAX_OFFSET", "openapi_schema"]

MAX_LIMIT = 1000
"""Most jobs one ``/jobs`` page holds."""

MAX_JOB_ID = 2**31 - 1
"""Job ids are 32-bit integers in the database; larger ones cannot exist (404)."""

MAX_OFFSET = 2**31 - 1
"""Largest ``/jobs`` offset (larger ones do not fit the database's integers)."""

_UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"

_NULLABLE_STR: dict[str, Any] = {"type": "string", "nullable": True}
_NULLABLE_INT: dict[str, Any] = {"type": "integer", "nullable": True}
_DATETIME: dict[str, Any] = {"type": "string", "format": "date-time"}
_NULLABLE_DATETIME: dict[str, Any] = {**_DATETIME, "nullable": True}

_JOB_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "series_id": {"type": "integer"},
    "version": {"type": "integer", "description": "Series version (1, then 2... on late data)."},
    "study_instance_uid": {"type": "string"},
    "series_instance_uid": {"type": "string"},
    "calling_ae": {"type": "string"},
    "state": {"type": "string", "enum": [s.value for s in JobState]},
    "attempts": {"type": "integer"},
    "max_attempts": {"type": "integer"},
    "instance_count": {"type": "integer"},
    "expected_count": _NULLABLE_INT,
    "lease_owner": _NULLABLE_STR,
    "lease_expires_at": _NULLABLE_DATETIME,
    "next_retry_at": _NULLABLE_DATETIME,
    "error_stage": _NULLABLE_STR,
    "error_reason": _NULLABLE_STR,
    "rejected_rule": _NULLABLE_STR,
    "timings": {
        "type": "object",
        "additionalProperties": {"type": "number"},
        "description": "Seconds per stage (load, preprocess, infer, postprocess, encode, "
        "send, process_total).",
    },
    "outputs": {
        "type": "object",
        "description": "``result`` (what was found) and ``sent`` (one entry per destination "
        "and instance).",
    },
    "superseded_by": _NULLABLE_INT,
    "created_at": _DATETIME,
    "updated_at": _DATETIME,
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Job": {
        "type": "object",
        "required": list(_JOB_PROPERTIES),
        "properties": _JOB_PROPERTIES,
    },
    "JobDetail": {
        "allOf": [
            {"$ref": "#/components/schemas/Job"},
            {
                "type": "object",
                "required": ["stages", "error", "destinations"],
                "properties": {
                    "stages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["stage", "status", "seconds"],
                            "properties": {
                                "stage": {
                                    "type": "string",
                                    "enum": [s.value for s in TIMED_STAGES],
                                },
                                "status": {
                                    "type": "string",
                                    "enum": ["done", "failed", "not run"],
                                },
                                "seconds": {"type": "number", "nullable": True},
                            },
                        },
                    },
                    "error": {
                        "type": "object",
                        "nullable": True,
                        "required": ["stage", "reason"],
                        "properties": {"stage": _NULLABLE_STR, "reason": {"type": "string"}},
                    },
                    "destinations": {
                        "type": "array",
                        "description": "What was sent where: one entry per destination.",
                        "items": {
                            "type": "object",
                            "required": ["name", "address", "stored", "failed", "instances"],
                            "properties": {
                                "name": {"type": "string"},
                                "address": _NULLABLE_STR,
                                "stored": {"type": "integer"},
                                "failed": {"type": "integer"},
                                "instances": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    },
                },
            },
        ]
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "total", "limit", "offset", "next_offset"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "total": {"type": "integer", "description": "Jobs matching the filters."},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "next_offset": {
                "type": "integer",
                "nullable": True,
                "description": "Offset of the next page; null on the last page.",
            },
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "checks"],
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["ok", "detail"],
                    "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
                },
            },
        },
    },
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("Error")}


_UNAUTHORIZED = _error("Bearer token missing or wrong.")
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_JOB_ID: dict[str, Any] = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
_STORE_DOWN = _error("The job store is unreachable.")

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "The process is alive (nothing else is checked).",
            "operationId": "healthz",
            "responses": {
                "200": {
                    "description": "Alive.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["status"],
                                "properties": {"status": {"type": "string", "enum": ["alive"]}},
                            }
                        }
                    },
                }
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "Every readiness check by name: database, engine, DICOM listener, "
            "spool space, assembler, workers.",
            "operationId": "readyz",
            "responses": {
                "200": {"description": "Ready.", "content": _json("Readiness")},
                "503": {"description": "A check failed.", "content": _json("Readiness")},
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics (text format 0.0.4).",
            "operationId": "metrics",
            "security": _SECURED,
            "responses": {
                "200": {
                    "description": "Instances and bytes received, associations refused, "
                    "jobs by state, stage latency histograms, send failures, queue depth.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": _UNAUTHORIZED,
            },
        }
    },
    "/jobs": {
        "get": {
            "summary": "Jobs, newest first, filtered by state, creation time and study; paged.",
            "operationId": "listJobs",
            "security": _SECURED,
            "parameters": [
                {
                    "name": "state",
                    "in": "query",
                    "schema": {"type": "string", "enum": [s.value for s in JobState]},
                    "description": "Only jobs in this state (any case).",
                },
                {
                    "name": "since",
                    "in": "query",
                    "schema": {"type": "string", "format": "date-time"},
                    "description": "Only jobs created at or after this ISO 8601 time "
                    "(UTC when no offset is given; a date alone means its midnight).",
                },
                {
                    "name": "until",
                    "in": "query",
                    "schema": {"type": "string", "format": "date-time"},
                    "description": "Only jobs created before this ISO 8601 time.",
                },
                {
                    "name": "study_uid",
                    "in": "query",
                    "schema": {"type": "string", "pattern": _UID_PATTERN, "maxLength": 64},
                    "description": "Only jobs of series in this study.",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT},
                },
                {
                    "name": "offset",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                },
            ],
            "responses": {
                "200": {"description": "One page of jobs.", "content": _json("JobList")},
                "400": _error("A filter or the page is malformed."),
                "401": _UNAUTHORIZED,
                "503": _STORE_DOWN,
            },
        }
    },
    "/jobs/{job_id}": {
        "get": {
            "summary": "One job: stages, timings, error, what was sent where.",
            "operationId": "getJob",
            "security": _SECURED,
            "parameters": [_JOB_ID],
            "responses": {
                "200": {"description": "The job.", "content": _json("JobDetail")},
                "401": _UNAUTHORIZED,
                "404": _error("No such job."),
                "503": _STORE_DOWN,
            },
        }
    },
    "/jobs/{job_id}/retry": {
        "post": {
            "summary": "Run a FAILED or DONE job again (back to QUEUED, attempts reset).",
            "operationId": "retryJob",
            "security": _SECURED,
            "parameters": [_JOB_ID],
            "responses": {
                "200": {"description": "The job, re-queued.", "content": _json("Job")},
                "401": _UNAUTHORIZED,
                "404": _error("No such job."),
                "409": _error("The job is in a state that cannot be retried."),
                "503": _STORE_DOWN,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document.",
            "operationId": "openapi",
            "security": _SECURED,
            "responses": {
                "200": {
                    "description": "OpenAPI 3.0 document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "401": _UNAUTHORIZED,
            },
        }
    },
}


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the node's HTTP API (a fresh copy each call).

    Returns
    -------
    dict
        OpenAPI 3.0.3, JSON-ready.
    """
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "UniCT node",
            "version": "1",
            "description": "Health, readiness, metrics and the job records of a UniCT "
            "DICOM node. Everything but /healthz and /readyz needs the bearer token when "
            "one is configured (always when the API listens beyond loopback).",
        },
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
