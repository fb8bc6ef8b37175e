"""The outside world's tools, wrapped: ffmpeg and ffprobe as child processes, yt-dlp's tools, the presigned upload."""
