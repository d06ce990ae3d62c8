"""The reference EfficientNet family. Import submodules directly (torch is imported lazily)."""
