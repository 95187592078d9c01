"""Data: shard writers, safe decoding, indexed map-style datasets and a resumable loader."""
