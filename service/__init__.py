"""The focus controller service: WC snapshot in, LensNet scores and legal edits out."""
