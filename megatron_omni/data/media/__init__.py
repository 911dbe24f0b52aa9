"""Media decoding for omni-modal samples (images, video, audio); see `synth` for writing test media."""
