"""Loom's live visual view (`loom view`): Loom's messages drawn with the Rerun viewer."""
