"""Audio codecs and VAEs, one per file (EnCodec, Oobleck, mel VAE + HiFi-GAN)."""
