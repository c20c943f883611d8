"""Test and debugging aids, added through the callbacks group (`+callbacks.NAME._target_=...`): never in a default."""
