#!/usr/bin/env bash
# Command of the roadshift worker container: create the process work pool when it is missing,
# then poll it. Environment: PREFECT_API_URL (required), PREFECT_API_AUTH_STRING (when the server
# has basic auth), ROADSHIFT_WORK_POOL (default roadshift-process), ROADSHIFT_WORKER_LIMIT
# (concurrent flow runs, default unlimited).
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://prefect-server:4200/api}"
pool="${ROADSHIFT_WORK_POOL:-roadshift-process}"

if ! prefect work-pool inspect "$pool" >/dev/null 2>&1; then
  # another worker may create it at the same moment: only fail if it still does not exist
  prefect work-pool create "$pool" --type process \
    || prefect work-pool inspect "$pool" >/dev/null
fi

args=(--pool "$pool" --type process)
if [[ -n "${ROADSHIFT_WORKER_LIMIT:-}" ]]; then
  args+=(--limit "$ROADSHIFT_WORKER_LIMIT")
fi
exec prefect worker start "${args[@]}"
