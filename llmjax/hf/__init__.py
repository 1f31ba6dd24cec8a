"""Hugging Face interop: import (`llmjax.hf.convert.import_run`), export (`export_run`), and `init_from=hf:DIR`
(`llmjax.runs.load_params`). The model families and their tensor names live in `families`, the sharded
safetensors reading and streaming writing in `weights`."""
