"""After pretraining: load any model the project makes or reads, extract embeddings, score variants zero-shot."""
