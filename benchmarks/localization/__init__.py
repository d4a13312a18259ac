"""The embedded localisation benchmark: digit canvases, small trained models, metrics, methods."""
