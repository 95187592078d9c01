"""Neural-network building blocks for the tokenizer (discriminator, decoders, ...)."""
