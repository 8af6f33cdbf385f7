"""Text conditioning: frozen text encoders (offline), an on-disk feature cache, and the trainer's conditioner."""

from gear.text.encoders import TEXT_ENCODERS, CaptionTruncated, TextEncoder, resolve_encoder_path

__all__ = ["TEXT_ENCODERS", "CaptionTruncated", "TextEncoder", "resolve_encoder_path"]
