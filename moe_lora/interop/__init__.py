"""Exchange with other libraries: PEFT LoRA folders (:mod:`.peft`)."""
