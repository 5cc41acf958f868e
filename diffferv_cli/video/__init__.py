"""Video in and out: ffmpeg probing, decoding, encoding, working-size geometry."""
