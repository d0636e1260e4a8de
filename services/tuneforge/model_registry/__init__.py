"""model-registry: fine-tuned models, their lineage and their assignment to agents."""
