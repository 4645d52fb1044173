"""Class hierarchies: groupings in canonical form, class embeddings, agglomerative clustering."""
