"""GeoForge engine: recipes, models, objectives, data, training loop, VideoGPA pipeline, evaluation."""
