#!/bin/sh
# One-shot MinIO set-up (run by the create-buckets service, image minio/mc): the buckets, and a
# service account whose keys are the clients' AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY. Safe to
# run again: existing buckets are kept, the account's secret is reset to the current value.
set -eu
: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${AWS_ACCESS_KEY_ID:?}" "${AWS_SECRET_ACCESS_KEY:?}"
BUCKETS="${BUCKETS:-roadshift-dvc mlflow-artifacts}"

tries=0
until mc alias set roadshift "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
  tries=$((tries + 1))
  [ "$tries" -lt 30 ] || { echo "MinIO at $MINIO_URL did not answer" >&2; exit 1; }
  sleep 2
done

for bucket in $BUCKETS; do
  mc mb --ignore-existing "roadshift/$bucket"
done

if [ "$AWS_ACCESS_KEY_ID" != "$MINIO_ROOT_USER" ]; then
  mc admin user add roadshift "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
  # attach fails when the policy is already attached (a re-run): accept that case only
  if ! mc admin policy attach roadshift readwrite --user "$AWS_ACCESS_KEY_ID" 2>/dev/null; then
    mc admin user info roadshift "$AWS_ACCESS_KEY_ID" | grep -q readwrite
  fi
fi
echo "buckets ready: $BUCKETS"
