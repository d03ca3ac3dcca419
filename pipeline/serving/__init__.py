"""Serving: the trained model answering images (predictor, api, cli, the drawing page). It imports
the shared core, never a stage."""
