"""Voxel-space geometry shared by data, networks and inference: small-organ ROI boxes (crop and paste)
and centre heatmaps (targets, peak decoding). Pure tensor maths; imports nothing else of organseg."""
