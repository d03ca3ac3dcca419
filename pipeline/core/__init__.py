"""The shared core: what the stages, serving and scale-out all use. Its flat modules are the
infrastructure (params, layout, files, tracking, registry, models, training, normalize); each folder
is a feature (trust, shifts, reading, graph). It imports none of the other wings."""
