"""Calibration and evaluation data: the samples the pipeline consumes (:mod:`.calibration`), text
(:mod:`.text`, with the shipped Wikipedia corpus beside it), images (:mod:`.images`) and
image-and-text prompts for Qwen-VL (:mod:`.vl`)."""
