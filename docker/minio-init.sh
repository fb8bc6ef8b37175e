#!/bin/sh
# One-shot set-up of the compose MinIO (run by the `minio-init` service, minio/mc image); idempotent.
# - creates the bucket the actors use (GGT_S3_BUCKET);
# - shows the stale multipart upload sweep: MinIO has no AbortIncompleteMultipartUpload lifecycle
#   action (it drops it from imported rules); its server-side sweep (MINIO_API_STALE_UPLOADS_EXPIRY
#   on the minio service) is the backstop for uploads a crashed uploader never aborted.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${GGT_S3_BUCKET:?set GGT_S3_BUCKET}"
: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"

mc alias set ggt "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "ggt/$GGT_S3_BUCKET"
echo "stale multipart upload sweep:"
mc admin config get ggt api | tr ' ' '\n' | grep '^stale_uploads_' || true
