"""Neural recommender families (torch), behind the same `Recommender` interface."""
