"""Trust: how far an answer can be believed. Temperatures and the "not sure" threshold (confidence),
their search on validation copies (calibration), and the "not a digit" gate with the non-digits it
learns from."""
