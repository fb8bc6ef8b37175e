#!/bin/sh
# One-shot set-up of the compose MinIO (run by the `minio-init` service, minio/mc image); idempotent.
# - creates the bucket the actors use (GGT_S3_BUCKET);
# - creates the service's user (GGT_S3_SERVICE_USER) with a policy on that bucket only, so the
#   coordinator, verifier and gateway never hold MinIO's root credentials;
# - shows the stale multipart upload sweep: MinIO has no AbortIncompleteMultipartUpload lifecycle
#   action (it drops it from imported rules); its server-side sweep (MINIO_API_STALE_UPLOADS_EXPIRY
#   on the minio service) is the backstop for uploads a crashed uploader never aborted.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${GGT_S3_BUCKET:?set GGT_S3_BUCKET}"
: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
: "${GGT_S3_SERVICE_USER:?set GGT_S3_SERVICE_USER}"
: "${GGT_S3_SERVICE_PASSWORD:?set GGT_S3_SERVICE_PASSWORD}"

mc alias set ggt "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "ggt/$GGT_S3_BUCKET"

# the bucket and its objects, nothing else (docs/DEPLOY.md lists what each actor uses)
policy=$(mktemp)
cat > "$policy" <<EOF
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetBucketLocation"],
   "Resource": ["arn:aws:s3:::$GGT_S3_BUCKET"]},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": ["arn:aws:s3:::$GGT_S3_BUCKET/*"]}
]}
EOF
mc admin policy create ggt ggt-bucket "$policy"
rm -f "$policy"
mc admin user add ggt "$GGT_S3_SERVICE_USER" "$GGT_S3_SERVICE_PASSWORD"
# attaching twice is refused ("already attached"): the set-up stays idempotent
mc admin policy attach ggt ggt-bucket --user "$GGT_S3_SERVICE_USER" 2>/dev/null || \
  mc admin user info ggt "$GGT_S3_SERVICE_USER" | grep -q ggt-bucket
echo "stale multipart upload sweep:"
mc admin config get ggt api | tr ' ' '\n' | grep '^stale_uploads_' || true
