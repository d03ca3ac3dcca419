"""Scale-out on Ray: sweeps as Ray Tune trials tracked in MLflow, batch scoring with Ray Data. It
imports the shared core and serving's predictor, never a stage."""
