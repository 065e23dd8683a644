"""Compressed updates with error feedback: codecs, wire format, the client mod, the adaptive choice."""
