"""Names and format markers of a checkpoint's files (no torch: the pipeline's driver stages
checkpoints without importing it)."""

FORMAT = "iqray-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
