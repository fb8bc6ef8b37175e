"""The wrappers of ffmpeg and the presigned upload, against real processes and a strict S3 front."""
