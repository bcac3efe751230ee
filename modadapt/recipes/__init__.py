"""Fine-tuning recipes for converted models."""
