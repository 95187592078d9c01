"""The generator: a Qwen2 deep-fusion backbone, latent embeddings, the wide DDT head and the sequence layout."""
