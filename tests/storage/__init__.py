"""Storage against S3 and the strict S3 front."""
