"""The files an edit writes into its ``out`` folder (one place, read by every job and by
:func:`~ditloc.edit.load_edit`)."""

RESULT_FILE = "ditloc_edit.json"  # the edit's record (EditResult.to_dict)
BLOCKS_FILE = "blocks.safetensors"  # changed full weights (closed form, full fine-tuning)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
