"""Moved to ``dual_attention.overlays`` (the drawing has no Ray); these names stay for callers not yet moved."""

from dual_attention.overlays import overlay_png_bytes, render_overlay, save_slide_score_overlay

__all__ = ["overlay_png_bytes", "render_overlay", "save_slide_score_overlay"]
