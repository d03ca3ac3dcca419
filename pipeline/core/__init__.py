"""The shared core: what the stages, serving and scale-out all use (params, layout, files, models,
training, normalize, confidence, gate, corruptions, tracking). It imports none of the other wings."""
