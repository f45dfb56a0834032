"""schemathesis hooks of tests/server/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``)."""

import uuid

import schemathesis


@schemathesis.hook
def map_headers(context, headers):
    # A client sends one Idempotency-Key per logical request: random keys that happen to repeat
    # across different requests are refused (422, as the IETF draft says), which tests nothing.
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = uuid.uuid4().hex
    return headers


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # Links inferred by the stateful phase copy a null id (a credential's batch_job_id) into a path
    # (/batch-jobs/None): not a request the document allows, so not a finding.
    return not any(value is None or value == "None" for value in (case.path_parameters or {}).values())
