"""The models veason-ray loads and the tiny stand-ins its tests and CPU demo use.

- `loading`: checkpoint specs (local folder, s3:// copy, Hugging Face hub id) to the Qwen2.5-VL policy and its
  processor, and to a frozen SAM2 video predictor; the one path for real and tiny checkpoints alike.
- `sam2_propagator`: `SAM2MaskPropagator`, the `MaskPropagator` that turns keyframe boxes into masks.
- `tiny_qwen`, `tiny_sam2`: random-init checkpoints in the real formats, written offline (`veason tiny-models`).
- `hf_policy`: answer generation with Hugging Face `generate`.

Submodules are imported on use: this package itself imports nothing heavy.
"""
