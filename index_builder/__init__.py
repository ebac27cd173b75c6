"""Reference images -> a versioned FAISS + local-feature index, searching it, and evaluating on it."""
