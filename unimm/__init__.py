"""unimm: unified text-to-image and image-editing models on semantic-autoencoder latents."""

__version__ = "0.1.0"
