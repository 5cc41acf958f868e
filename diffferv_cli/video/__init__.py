"""Video in and out: `probe` (PyAV: what a file holds), `io` (the ffmpeg binary: decoding, encoding,
output checks), `geometry` (pure: working size, frame selection, padding)."""
