"""Reference images -> versioned FAISS + local-feature index (see the index issue)."""
