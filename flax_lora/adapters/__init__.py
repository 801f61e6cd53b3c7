"""Adapters on disk: the native layout, PEFT's, merged checkpoints, and finding either kind."""
