"""The scheduler's browser dashboard: a single page served with its own scripts and styles (no CDN)."""

from services.scheduler.dashboard.router import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
