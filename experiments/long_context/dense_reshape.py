"""Why context parallelism with more than one row a device held more memory per device at a larger context:
XLA's temporaries of the `tiny` train step (batch 8, so the tokens per device are equal at every context size;
blockwise attention, ring) with `llmjax.models.layers.dense` flattening [B, T, D] into [B*T, D] for a 2-D matmul
(what it does on XLA:CPU) and keeping [B, T] as free axes of one dot_general (what it does elsewhere:
layers.flatten_dots), beside the number of all-gathers whose output holds the whole sequence. Compiled only, on 8
fake CPU devices:

  python -m experiments.long_context.dense_reshape 8192 2,4,8      # a few minutes on 2 CPU cores
"""

import re
import sys

import jax


def main(seq_len: int, contexts: list[int]) -> None:
    jax.config.update("jax_num_cpu_devices", 8)
    from llmjax import config
    from llmjax.estimate import train_step
    from llmjax.models import layers
    from llmjax.sharding import make_mesh

    on_cpu = layers.flatten_dots
    for c in contexts:
        for name, flat in (("reshape", True), ("dot_general", False)):
            layers.flatten_dots = lambda flat=flat: flat
            cfg = config.base("tiny")
            cfg.batch_size, cfg.seq_len, cfg.eval_every, cfg.model.max_seq_len = 8, seq_len, 0, seq_len
            cfg.mesh.update(fsdp=8 // c, context=c, tensor=1)
            cfg.model.update(attention="blockwise", context_parallel="ring")
            task, batch = train_step(cfg, make_mesh(cfg.mesh))
            step = task.jit_step(jax.tree.map(lambda x: x.sharding, task.abstract))
            compiled = step.lower(task.abstract, batch, *task.frozen).compile()
            gathers = re.findall(rf"= f32\[\d+,{seq_len},[\d,]+\]\S* all-gather\(", compiled.as_text())
            print(f"T={seq_len} context={c} dense={name}: temp "
                  f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} MiB, all-gathers of whole-sequence "
                  f"activations: {len(gathers)}", flush=True)
    layers.flatten_dots = on_cpu


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192,
         [int(c) for c in sys.argv[2].split(",")] if len(sys.argv) > 2 else [2, 4, 8])
