"""Semantic-autoencoder image tokenizers: PS-VAE, S-AE, GAE, ReaLS, RAE and VAE as presets of one framework."""
