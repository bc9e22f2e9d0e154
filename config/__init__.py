"""Settings and data files that configure an Intake deployment."""

from config.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError"]
